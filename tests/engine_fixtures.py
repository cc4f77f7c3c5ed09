"""An engine over a tiny checkpoint with PEFT adapters published in a real store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxlora.adapter_format import read_published
from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
from jaxlora.hf_checkpoint import load_params, model_fingerprint
from jaxlora.engine import Engine, EngineConfig
from jaxlora.lora import zeros_stack
from jaxlora.model import lora_shapes
from jaxlora.scheduler import Finished, RequestHandle, Scheduler, TokenEvent
from jaxlora.slots import SlotCache
from tests.peft_adapters import ADAPTER_SPECS, make_peft_adapter

ENGINE_CONFIG = EngineConfig(max_batch_size=8, max_seq_len=64, prefill_buckets=(8, 16, 32), decode_steps=4,
                             max_queue=512, num_adapter_slots=4, max_lora_rank=8)


@dataclasses.dataclass
class TinyEngine:
    base_dir: Path
    peft_dirs: dict[str, Path]
    store: AdapterStore
    engine: Engine
    slots: SlotCache
    adapters: dict[str, ResolvedAdapter]

    def scheduler(self, start: bool = True) -> Scheduler:
        s = Scheduler(self.engine, self.slots, self.engine.cfg.eos_token_ids)
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
    params, cfg = load_params(base_dir)
    fingerprint = model_fingerprint(base_dir)
    store = AdapterStore(root / "fs")
    peft_dirs, adapters = {}, {}
    for i, name in enumerate(ADAPTER_SPECS):
        peft_dirs[name] = make_peft_adapter(base_dir, name, root / "peft" / name, seed=10 + i)
        src = peft_dirs[name]
        adapters[name] = store.publish(
            "alice", name, lambda d, src=src: [(d / f.name).write_bytes(f.read_bytes()) for f in src.iterdir()],
            base_model={"name": "tiny", "fingerprint": fingerprint})
    slots = SlotCache(zeros_stack(lora_shapes(cfg), config.num_adapter_slots, config.max_lora_rank),
                      lambda r: read_published(r.path, cfg, config.max_lora_rank, fingerprint))
    engine = Engine(params, cfg, config)
    slots.warm_up()
    engine.warm_up(slots.stack)
    return TinyEngine(base_dir, peft_dirs, store, engine, slots, adapters)


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
