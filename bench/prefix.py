"""Shared prefixes and long prompts on the 8-layer benchmark model, max_seq_len 4096, 4 adapters.

    python -m bench.prefix [--model bench|smollm2] [--requests 24] [--seconds 8] [--rounds 2]

`--model smollm2` runs the same on the real default model (`bench.common.MODELS`).
(a) TTFT of requests that share a 384-token system prompt and differ in a 32-token user turn, one
    at a time over the 4 adapters: with the prefix cache, with it off (the same replica), and
    transformers + PEFT (`generate`, one new token) on the same prompts.
(b) 16 streams decoding while 2048-token prompts arrive back to back: the streams' inter-token
    latency, p50/p99, with no long prompt arriving and while they arrive, for chunked prefill
    (`--chunk`) against one-shot prefill (a chunk of 2048, the prompt in one call). Inter-token
    latency here is the time between two decode calls that deliver tokens to the streams, divided by
    the tokens each delivers (`decode_steps`): what a stream sees, per token, on its burst boundaries.
    The phases alternate (quiet, arriving, quiet, ...) for `--rounds` rounds, pooled.

In process (no Ray, no HTTP): what the engine does. Not a test: figures go in docs/benchmarks.md;
the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import MODELS, bench_model, emit, machine, peft_peer
from jaxlora.engine import EngineConfig

SYSTEM, TURN, LONG, STREAMS, SEQ = 384, 32, 2048, 16, 4096


def _pct(xs: list[float]) -> dict[str, float | None]:
    """p50 and p99 in ms; None for no samples (in (b): no two decode calls in a phase, a stall as long as it)."""
    xs = sorted(xs)
    if not xs:
        return {"p50": None, "p99": None, "n": 0}
    return {"p50": round(1000 * statistics.median(xs), 2), "p99": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 2),
            "n": len(xs)}


def _replica(model_dir: Path, peft_dirs: list[Path], **engine):
    from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
    from jaxlora.replica import build_replica

    config = EngineConfig(max_seq_len=SEQ, num_adapter_slots=len(peft_dirs) + 1, max_lora_rank=16, **engine)
    replica = build_replica(model_dir, AdapterStore(tempfile.mkdtemp()), config)
    return replica, [ResolvedAdapter("bench", d.name, "v0001", d) for d in peft_dirs]


def shared_prefix_ttft(model_dir: Path, peft_dirs: list[Path], prompts: list[list[int]], chunk: int,
                       prefill_batch: int) -> dict:
    from jaxlora.prefix_cache import PrefixCache
    from jaxlora.sampling import SamplingParams

    replica, adapters = _replica(model_dir, peft_dirs, max_batch_size=4, prefill_chunk=chunk, prefill_batch=prefill_batch)
    sched = replica.scheduler
    sched.start()
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def ttfts() -> tuple[list[float], int]:
        out, cached = [], 0
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            handle = sched.submit(p, one, adapters[i % len(adapters)])
            next(iter(handle))
            out.append(time.perf_counter() - t0)
            cached += [e for e in handle][-1].cached_tokens
        return out, cached

    try:
        for a in adapters:  # adapters into their slots, off the clock
            list(sched.submit([1, 2, 3], one, a))
        sched.prefix = PrefixCache(0, chunk)
        off, _ = ttfts()
        sched.prefix = PrefixCache(replica.engine.config.prefix_cache_bytes, chunk, replica.fingerprint)
        on, cached = ttfts()
        stats = sched.prefix.snapshot()
    finally:
        replica.close()
    return {"cache_on": _pct(on), "cache_off": _pct(off), "cached_tokens": cached, "prefix_cache": stats}


def peer_ttft(model_dir: Path, peft_dirs: list[Path], prompts: list[list[int]]) -> dict:
    import torch

    model = peft_peer(model_dir, peft_dirs)
    out = []
    with torch.inference_mode():
        for i, p in enumerate([prompts[0]] + prompts):  # the first one warms up
            model.set_adapter(peft_dirs[i % len(peft_dirs)].name)
            ids = torch.tensor([p])
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1,
                           pad_token_id=0)
            out.append(time.perf_counter() - t0)
    return _pct(out[1:])


def long_prompts_itl(model_dir: Path, peft_dirs: list[Path], chunk: int, prefill_batch: int, budget: int,
                     seconds: float, rounds: int, rng) -> dict:
    """Inter-token latency of STREAMS decoding rows, quiet and with LONG-token prompts arriving."""
    from jaxlora.sampling import SamplingParams
    from jaxlora.scheduler import Scheduler

    replica, adapters = _replica(model_dir, peft_dirs, max_batch_size=STREAMS + 2, prefill_chunk=chunk,
                                 prefill_batch=prefill_batch, prefill_tokens_per_turn=budget,
                                 prefix_cache_bytes=0)  # every long prompt computed
    sched = replica.scheduler
    decoded: list[tuple[float, int]] = []  # (when a decode call delivered, rows it delivered to)
    original = Scheduler._decode

    def timed_decode(self) -> None:
        rows = len(self._decoding())
        original(self)
        decoded.append((time.monotonic(), rows))

    sched._decode = timed_decode.__get__(sched)
    sched.start()
    steps = replica.engine.config.decode_steps
    streams = [sched.submit(rng.integers(3, 8192, size=32).tolist(),
                            SamplingParams(max_tokens=SEQ - 64, temperature=0.0, ignore_eos=True), adapters[i % len(adapters)])
               for i in range(STREAMS)]
    for h in streams:
        next(iter(h))
    arriving = threading.Event()
    stop = threading.Event()
    long_ttft: list[float] = []

    def feeder() -> None:
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        while not stop.is_set():
            if not arriving.wait(0.05):
                continue
            t0 = time.perf_counter()
            list(sched.submit(rng.integers(3, 8192, size=LONG).tolist(), one, adapters[0]))
            long_ttft.append(time.perf_counter() - t0)

    thread = threading.Thread(target=feeder, daemon=True)
    thread.start()
    phases = {"quiet": [], "arriving": []}
    try:
        time.sleep(1.0)  # every stream decoding
        for _ in range(rounds):
            for phase in ("quiet", "arriving"):
                (arriving.set if phase == "arriving" else arriving.clear)()
                start = len(decoded)
                time.sleep(seconds)
                calls = decoded[start:]
                phases[phase] += [(b - a) / steps for (a, _), (b, rows) in zip(calls, calls[1:]) if rows >= STREAMS]
            arriving.clear()
    finally:
        stop.set()
        arriving.clear()
        thread.join(timeout=120)
        for h in streams:
            h.cancel()
        replica.close()
    quiet, busy = _pct(phases["quiet"]), _pct(phases["arriving"])
    return {"chunk": chunk, "prefill_batch": prefill_batch, "prefill_tokens_per_turn": budget,
            "quiet_itl_ms": quiet, "arriving_itl_ms": busy,
            "p99_ratio": round(busy["p99"] / quiet["p99"], 2) if busy["n"] and quiet["n"] else None,
            "long_prompts": len(long_ttft),
            "long_ttft_ms": _pct(long_ttft) if long_ttft else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64, help="prefill_chunk of the chunked runs (the engine default)")
    ap.add_argument("--prefill-batch", type=int, default=EngineConfig.prefill_batch)
    ap.add_argument("--prefill-tokens-per-turn", type=int, default=EngineConfig.prefill_tokens_per_turn)
    ap.add_argument("--seconds", type=float, default=8.0, help="each phase of (b)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--model", choices=MODELS, default="bench")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    args = ap.parse_args(argv)
    model_dir, peft_dirs = bench_model(args.work_dir, args.adapters, args.model)
    rng = np.random.default_rng(0)
    result = {"benchmark": "prefix_cache_and_chunked_prefill", "model": args.model, "max_seq_len": SEQ, "adapters": args.adapters,
              "machine": machine()}
    parts = args.parts.split(",")
    if "a" in parts:
        system = rng.integers(3, 8192, size=SYSTEM).tolist()
        prompts = [system + rng.integers(3, 8192, size=TURN).tolist() for _ in range(args.requests)]
        ours = shared_prefix_ttft(model_dir, peft_dirs, prompts, args.chunk, args.prefill_batch)
        print(f"(a) ours: {ours}", flush=True)
        peer = peer_ttft(model_dir, peft_dirs, prompts)
        print(f"(a) transformers + peft: {peer}", flush=True)
        result["a_shared_prefix_ttft_ms"] = {**ours, "peer": peer,
                                             "cached_over_uncached": round(ours["cache_on"]["p50"] / ours["cache_off"]["p50"], 3),
                                             "cached_over_peer": round(ours["cache_on"]["p50"] / peer["p50"], 3)}
    if "b" in parts:
        runs = {}
        for name, chunk in (("chunked", args.chunk), ("one_shot", LONG)):
            runs[name] = long_prompts_itl(model_dir, peft_dirs, chunk, args.prefill_batch, args.prefill_tokens_per_turn,
                                          args.seconds, args.rounds, rng)
            print(f"(b) {name}: {runs[name]}", flush=True)
        result["b_long_prompts_itl"] = runs
    emit(result)


if __name__ == "__main__":
    main()
