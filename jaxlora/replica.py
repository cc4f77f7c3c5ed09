"""One model replica's parts, assembled in one place.

    build_replica(model_dir, store, EngineConfig) -> Replica
        engine     the jitted device functions over the loaded checkpoint (`engine.py`)
        slots      the device adapter slots and the host cache behind them (`slots.py`)
        scheduler  the host loop that batches requests into the engine's rows (`scheduler.py`)
        versions   which adapter version new requests get, following `latest` (`adapter_versions.py`)

The backend (`backend.py`, which the Ray deployment wraps), the tests' engine fixtures and the
engine benchmark all build a replica here, so a new part or option is wired once. Nothing is
started by building: `start()` runs the scheduler loop and the version poller.

What it deliberately does not do: tokenization, text, HTTP (the backend and the Serve layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from jaxlora.adapter_format import read_published
from jaxlora.adapter_store import AdapterStore
from jaxlora.adapter_versions import AdapterVersions
from jaxlora.hf_checkpoint import load_params, model_fingerprint
from jaxlora.config import ModelConfig
from jaxlora.engine import Engine, EngineConfig
from jaxlora.lora import zeros_stack
from jaxlora.model import lora_shapes
from jaxlora.scheduler import Scheduler
from jaxlora.slots import SlotCache


@dataclasses.dataclass
class Replica:
    model_dir: Path
    model_config: ModelConfig
    fingerprint: str  # of the checkpoint; published adapters record the one they were trained on
    store: AdapterStore
    engine: Engine
    slots: SlotCache
    scheduler: Scheduler
    versions: AdapterVersions

    def start(self) -> "Replica":
        self.scheduler.start()
        self.versions.start()
        return self

    def close(self) -> None:
        self.versions.stop()
        self.scheduler.stop()
        self.slots.close()


def build_slots(model_config: ModelConfig, config: EngineConfig, fingerprint: str) -> SlotCache:
    """Empty device slots for `config`, loading published versions checked against `fingerprint`."""
    stack = zeros_stack(lora_shapes(model_config), config.num_adapter_slots, config.max_lora_rank,
                        dtype=config.jnp_dtype)
    return SlotCache(stack, lambda r: read_published(r.path, model_config, config.max_lora_rank, fingerprint),
                     config.host_adapter_cache)


def build_replica(model_dir: str | Path, store: AdapterStore, config: EngineConfig = EngineConfig(), *,
                  eos_token_ids: Iterable[int] = (), poll_interval_s: float = 1.0, warm_up: bool = True) -> Replica:
    """Loads the checkpoint and builds every part; `warm_up` compiles each shape a request can use
    (so no request compiles). Requests stop at the checkpoint's EOS ids plus `eos_token_ids`."""
    model_dir = Path(model_dir)
    params, model_config = load_params(model_dir, config.jnp_dtype)
    fingerprint = model_fingerprint(model_dir)
    slots = build_slots(model_config, config, fingerprint)
    engine = Engine(params, model_config, config)
    if warm_up:
        slots.warm_up()
        engine.warm_up(slots.stack)
    eos = tuple(sorted(set(model_config.eos_token_ids) | set(eos_token_ids)))
    scheduler = Scheduler(engine, slots, eos, base_model=fingerprint)
    return Replica(model_dir, model_config, fingerprint, store, engine, slots, scheduler,
                   AdapterVersions(store, slots, poll_interval_s, retired=scheduler.prefix.drop))
