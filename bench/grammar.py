"""The cost of constrained decoding: decode throughput with half the rows under a JSON schema, against
the same batch with none.

    python -m bench.grammar [--requests 16] [--prompt-len 64] [--gen-len 64] [--repeats 3]

On the real default model (SmolLM2-135M-Instruct: its 49152-token vocabulary is what a mask is
computed over), 16 greedy requests over 8 adapters, 64 prompt + 64 generated tokens each. The
constrained half follows an array of at least 50 objects with typed fields (so no answer can end
inside 64 tokens, and every token's mask is a JSON grammar's, not free text's). The peer is the same
engine on the same requests with no grammar, in the same run. Reports tok/s of both, their ratio
(the issue's target is >= 0.7), the host time per mask, and the grammar's compile time. One JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import bench_model, emit, machine
from jaxlora.engine import EngineConfig

SCHEMA = {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    args = ap.parse_args(argv)

    from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
    from jaxlora.engine import compile_count
    from jaxlora.grammar import GrammarCompiler, json_schema_grammar
    from jaxlora.replica import build_replica
    from jaxlora.sampling import SamplingParams
    from jaxlora.tokenizer import load_tokenizer

    model_dir, peft_dirs = bench_model(args.work_dir, args.adapters, "smollm2")
    n, gen = args.requests, args.gen_len
    config = EngineConfig(max_batch_size=n, max_seq_len=args.prompt_len + gen, prefill_chunk=args.prompt_len,
                          num_adapter_slots=len(peft_dirs) + 1, max_lora_rank=16)
    replica = build_replica(model_dir, AdapterStore(tempfile.mkdtemp()), config)
    compiler = GrammarCompiler(load_tokenizer(model_dir), replica.model_config.vocab_size,
                               replica.scheduler.eos_token_ids)
    grammar = json_schema_grammar(SCHEMA)
    compiler.tokenizer()  # the vocabulary's view, built once per replica: not the grammar's cost
    t0 = time.perf_counter()
    compiler.matcher(grammar)
    compile_s = time.perf_counter() - t0
    adapters = [ResolvedAdapter("bench", d.name, "v0001", d) for d in peft_dirs]
    prompts = np.random.default_rng(0).integers(3, 8192, size=(n, args.prompt_len)).tolist()
    sched = replica.scheduler
    sched.start()

    def timed(constrained: int) -> float:
        start = time.perf_counter()
        handles = []
        for i, p in enumerate(prompts):
            if i < constrained:
                handles.append(sched.submit(p, SamplingParams(max_tokens=gen, temperature=0.0), adapters[i % len(adapters)],
                                            grammar=compiler.matcher(grammar)))
            else:
                handles.append(sched.submit(p, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True),
                                            adapters[i % len(adapters)]))
        produced = sum(sum(1 for _ in h) - 1 for h in handles)
        assert produced == n * gen, f"{produced} tokens, expected {n * gen}: a constrained answer ended early"
        return produced / (time.perf_counter() - start)

    timed(n // 2)  # adapters into their slots, the grammar's first masks; not measured
    compiles = compile_count()
    free, half = [], []
    for _ in range(args.repeats):  # alternated, so drift on a shared machine hits both alike
        free.append(timed(0))
        masks0, seconds0 = replica.engine.mask_stats
        half.append(timed(n // 2))
        masks1, seconds1 = replica.engine.mask_stats
    sched.stop()
    emit({
        "benchmark": "grammar_decode_half_constrained", "model": "smollm2", "requests": n, "constrained": n // 2,
        "prompt_len": args.prompt_len, "gen_len": gen,
        "unconstrained_tok_s": round(max(free), 1), "half_constrained_tok_s": round(max(half), 1),
        "ratio": round(max(half) / max(free), 3),
        "mask_us_per_token": round((seconds1 - seconds0) / max(1, masks1 - masks0) * 1e6, 1),
        "grammar_compile_ms": round(compile_s * 1000, 1),
        "recompiles_during_runs": compile_count() - compiles, "machine": machine(),
    })


if __name__ == "__main__":
    main()
