"""An engine over a tiny checkpoint with PEFT adapters published in a real store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
from jaxlora.hf_checkpoint import model_fingerprint
from jaxlora.engine import Engine, EngineConfig
from jaxlora.replica import Replica, build_replica
from jaxlora.requests import Finished, RequestHandle, TokenEvent
from jaxlora.scheduler import Scheduler
from jaxlora.slots import SlotCache
from tests.peft_adapters import ADAPTER_SPECS, make_peft_adapter

ENGINE_CONFIG = EngineConfig(max_batch_size=8, max_seq_len=64, prefill_chunk=8, prefill_batch=4, decode_steps=4,
                             max_queue=512, num_adapter_slots=4, max_lora_rank=8)


@dataclasses.dataclass
class TinyEngine:
    base_dir: Path
    peft_dirs: dict[str, Path]
    replica: Replica
    adapters: dict[str, ResolvedAdapter]

    @property
    def engine(self) -> Engine:
        return self.replica.engine

    @property
    def slots(self) -> SlotCache:
        return self.replica.slots

    @property
    def store(self) -> AdapterStore:
        return self.replica.store

    def scheduler(self, start: bool = True) -> Scheduler:
        """A new loop over the shared engine and slots (each test starts and stops its own)."""
        s = Scheduler(self.engine, self.slots, self.replica.model_config.eos_token_ids)
        if start:
            s.start()
        return s

    def run_at_row(self, needle: tuple, fillers: list[tuple], position: int) -> tuple:
        """`collect` of the needle request submitted after fillers[:position] and before the rest, all
        queued before the loop starts, so the needle lands in decode row `position`."""
        sched = self.scheduler(start=False)
        try:
            before = [sched.submit(*f) for f in fillers[:position]]
            handle = sched.submit(*needle)
            after = [sched.submit(*f) for f in fillers[position:]]
            sched.start()
            got = collect(handle)
            for h in before + after:
                collect(h)
        finally:
            sched.stop()
        return got


def build_tiny_engine(base_dir: Path, root: Path, config: EngineConfig = ENGINE_CONFIG) -> TinyEngine:
    fingerprint = model_fingerprint(base_dir)
    store = AdapterStore(root / "fs")
    peft_dirs, adapters = {}, {}
    for i, name in enumerate(ADAPTER_SPECS):
        peft_dirs[name] = make_peft_adapter(base_dir, name, root / "peft" / name, seed=10 + i)
        src = peft_dirs[name]
        adapters[name] = store.publish(
            "alice", name, lambda d, src=src: [(d / f.name).write_bytes(f.read_bytes()) for f in src.iterdir()],
            base_model={"name": "tiny", "fingerprint": fingerprint})
    return TinyEngine(base_dir, peft_dirs, build_replica(base_dir, store, config), adapters)


def collect(handle: RequestHandle) -> tuple[list[int], list[float], list[tuple], Finished]:
    tokens, logprobs, tops = [], [], []
    for ev in handle:
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
            logprobs.append(ev.logprob)
            tops.append(ev.top_logprobs)
        else:
            return tokens, logprobs, tops, ev
    raise AssertionError("stream ended without Finished")
