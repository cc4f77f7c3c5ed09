"""Decode throughput: our engine vs transformers + PEFT, same weights, prompts and token counts.

    python -m bench.engine [--model bench|smollm2] [--requests 16] [--adapters 8] [--prompt-len 64] [--gen-len 64]
                           [--prefill-batch N]

16 concurrent requests over 8 distinct rank-16 adapters (all seven projections) on an 8-layer,
512-wide Llama (`--model smollm2`: the real default model, `bench.common.MODELS`), 64 prompt + 64
generated tokens each. The peer is PEFT's mixed-adapter batch,
`generate(adapter_names=...)`, on the same files. Both sides are warmed up once; the wall time
from submitting the requests to the last token is measured, best of `--repeats`. Also measures
our throughput with one adapter for every request (`mixed_over_single`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MODELS, bench_model, emit, machine, peft_peer
from jaxlora.engine import EngineConfig


def run_ours(model_dir: Path, peft_dirs: list[Path], prompts: list[list[int]], gen_len: int, repeats: int,
             prefill_batch: int) -> dict:
    from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
    from jaxlora.engine import compile_count
    from jaxlora.replica import build_replica
    from jaxlora.sampling import SamplingParams

    n = len(prompts)
    config = EngineConfig(max_batch_size=n, max_seq_len=len(prompts[0]) + gen_len, prefill_chunk=len(prompts[0]),
                          decode_steps=16, num_adapter_slots=len(peft_dirs) + 1, max_lora_rank=16,
                          prefill_batch=prefill_batch)
    # The adapters are read straight from their PEFT folders (no store manifest to check).
    replica = build_replica(model_dir, AdapterStore(tempfile.mkdtemp()), config, warm_up=False)
    adapters = [ResolvedAdapter("bench", d.name, "v0001", d) for d in peft_dirs]
    t0 = time.perf_counter()
    replica.slots.warm_up()
    replica.engine.warm_up(replica.slots.stack)
    warm_s = time.perf_counter() - t0
    sched = replica.scheduler
    sched.start()
    sp = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)

    def timed(which: list[ResolvedAdapter]) -> float:
        start = time.perf_counter()
        handles = [sched.submit(p, sp, a) for p, a in zip(prompts, which)]
        produced = sum(sum(1 for _ in h) - 1 for h in handles)
        assert produced == n * gen_len
        return n * gen_len / (time.perf_counter() - start)

    mixed_which = [adapters[i % len(adapters)] for i in range(n)]
    single_which = [adapters[0]] * n
    timed(mixed_which)  # loads every adapter into its slot; not measured
    compiles = compile_count()
    mixed = max(timed(mixed_which) for _ in range(repeats))
    single = max(timed(single_which) for _ in range(repeats))
    recompiles = compile_count() - compiles
    sched.stop()
    return {"mixed_tok_s": mixed, "single_tok_s": single, "warm_up_s": warm_s, "recompiles_during_runs": recompiles}


def run_peer(model_dir: Path, peft_dirs: list[Path], prompts: list[list[int]], gen_len: int, repeats: int) -> float:
    import torch

    model = peft_peer(model_dir, peft_dirs)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts)
    names = [peft_dirs[i % len(peft_dirs)].name for i in range(len(prompts))]

    def timed() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                 do_sample=False, max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == gen_len
        return len(prompts) * gen_len / (time.perf_counter() - start)

    timed()  # warm-up
    return max(timed() for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-batch", type=int, default=EngineConfig.prefill_batch)
    ap.add_argument("--model", choices=MODELS, default="bench")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    args = ap.parse_args(argv)
    model_dir, peft_dirs = bench_model(args.work_dir, args.adapters, args.model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 8192, size=(args.requests, args.prompt_len)).tolist()
    ours = run_ours(model_dir, peft_dirs, prompts, args.gen_len, args.repeats, args.prefill_batch)
    print(f"ours: {ours}", flush=True)
    peer = run_peer(model_dir, peft_dirs, prompts, args.gen_len, args.repeats)
    print(f"peer (transformers + peft generate, adapter_names): {peer:.1f} tok/s", flush=True)
    emit({
        "benchmark": "engine_decode_mixed_adapters", "model": args.model,
        "requests": args.requests, "adapters": args.adapters, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "prefill_batch": args.prefill_batch,
        "ours_tok_s": round(ours["mixed_tok_s"], 1), "ours_single_adapter_tok_s": round(ours["single_tok_s"], 1),
        "peer_tok_s": round(peer, 1), "ratio": round(ours["mixed_tok_s"] / peer, 2),
        "mixed_over_single": round(ours["mixed_tok_s"] / ours["single_tok_s"], 3),
        "recompiles_during_runs": ours["recompiles_during_runs"], "machine": machine(),
    })


if __name__ == "__main__":
    main()
