"""Where a decode step goes: the real model's step taken apart, at 1 and at 16 rows.

    python -m bench.step [--model smollm2|bench] [--rows 1 16] [--cache 128]

Times (median of repeated, jitted calls on the engine's own shapes, the CPU kernels as the engine
uses them; every row with a rank-16 adapter on all seven projections, one adapter per row):
  step        one decode step of `Engine.generate` (a call of `decode_steps` steps, divided)
  layers      the 30 decoder layers (`hidden_states`, the embedding lookup and final norm included)
  per layer:  qkvo (the four attention projections), attention (the decode kernel over the cache),
              mlp (gate, up, down and the norm), lora (the seven BGMV products)
  head        the output layer, [rows, 576] @ [576, 49152] (the tied embedding, transposed)
  head_pre    the same product with the transposed matrix made once, outside the step
  sample      greedy sampling of the logits (`sampling.sample`), without and with logprobs
  loop_step   a step as `rows` requests see it through the scheduler's loop (its host work included)
and the weight bytes a step reads, over the step time: the bandwidth the step reaches. Prints one
JSON line, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MODELS, bench_model, emit, machine


def _ms(fn, *args, repeats: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(model_dir: Path, peft_dir: Path, rows: int, cache_len: int, decode_steps: int = 16) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxlora import kernels
    from jaxlora.adapter_store import AdapterStore, ResolvedAdapter
    from jaxlora.engine import EngineConfig, PrefillItem
    from jaxlora.model import PROJECTIONS, _project, hidden_states, lm_head, rms_norm
    from jaxlora.replica import build_replica
    from jaxlora.sampling import RowSampling, SamplingParams, TokenHistory, sample

    config = EngineConfig(max_batch_size=rows, max_seq_len=cache_len, prefill_chunk=cache_len // 2,
                          decode_steps=decode_steps, num_adapter_slots=2, max_lora_rank=16)
    replica = build_replica(model_dir, AdapterStore(tempfile.mkdtemp()), config, warm_up=False)
    engine, slots = replica.engine, replica.slots
    adapter = ResolvedAdapter("bench", peft_dir.name, "v0001", peft_dir)
    slot = slots.acquire(adapter)
    stack, params = slots.stack, engine.params
    cfg = dataclasses.replace(engine.model_config, decode_kernels=engine.decode_kernels)  # as its steps run
    greedy = SamplingParams(max_tokens=cache_len, temperature=0.0, ignore_eos=True)
    state = engine.init_state()
    rng = np.random.default_rng(0)
    prompt_len = cache_len // 2 - 1
    for row in range(rows):  # every row's prompt in its cache, each then decoding
        prompt = tuple(int(t) for t in rng.integers(3, cfg.vocab_size, prompt_len))
        state, *_ = engine.prefill(stack, state, [PrefillItem(row, prompt, 0, slot, greedy, row)])

    def generate(state):
        return engine.generate(stack, state)

    state, _ = generate(state)
    jax.block_until_ready(state.tokens)
    times = []
    for _ in range(max(1, (cache_len - prompt_len) // decode_steps - 2)):  # stay inside the cache
        t0 = time.perf_counter()
        state, out = generate(state)
        jax.block_until_ready(out.token)
        times.append(time.perf_counter() - t0)
    out = {"step": 1000 * statistics.median(times) / decode_steps}

    tokens = state.tokens[:, None]
    positions = jnp.full((rows, 1), prompt_len + 1, jnp.int32)
    slots_B = jnp.full((rows,), slot, jnp.int32)
    layers = jax.jit(lambda t, p, c: hidden_states(params, t, p, cfg, c, stack, slots_B), donate_argnums=(2,))
    cache = jax.tree.map(jnp.copy, state.cache)
    times = []
    for _ in range(21):  # the cache donated and fed back, as the step does (else every call copies it)
        t0 = time.perf_counter()
        x, cache = layers(tokens, positions, cache)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
    out["layers"] = 1000 * statistics.median(times[1:])
    lp, layer = params.layers[0], stack.layers[0]
    h = jnp.asarray(rng.standard_normal((rows, 1, cfg.hidden_size)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((rows, 1, cfg.q_size)), jnp.float32)
    out["qkvo"] = _ms(jax.jit(lambda h, a: [*(_project(h, lp, n, None) for n in ("q_proj", "k_proj", "v_proj")),
                                            _project(a, lp, "o_proj", None)]), h, a)

    def mlp(h):
        n = rms_norm(h, lp.mlp_norm, cfg.rms_norm_eps)
        return _project(jax.nn.silu(_project(n, lp, "gate_proj", None)) * _project(n, lp, "up_proj", None), lp,
                        "down_proj", None)

    out["mlp"] = _ms(jax.jit(mlp), h)
    q = jnp.asarray(rng.standard_normal((rows, cfg.num_heads, cfg.head_dim)), jnp.float32)
    out["attention"] = _ms(jax.jit(lambda q, k, v, p: kernels.decode_attention(q, k, v, p, cfg.sliding_window)),
                           q, state.cache.k[0], state.cache.v[0], positions[:, 0])
    xs = {n: jnp.asarray(rng.standard_normal((rows, PROJECTIONS[n].shape(cfg)[0])), jnp.float32) for n in layer}
    out["lora"] = _ms(jax.jit(lambda xs: [kernels.bgmv(xs[n], m.a, m.b, stack.scale, slots_B) for n, m in layer.items()]),
                      xs)
    x = jnp.asarray(rng.standard_normal((rows, 1, cfg.hidden_size)), jnp.float32)
    out["head"] = _ms(jax.jit(lambda x: lm_head(params, x)), x)
    head_DxV = jnp.asarray(params.embed.T if params.lm_head is None else params.lm_head)
    out["head_pre"] = _ms(jax.jit(lambda x, w: (x @ w).astype(jnp.float32)), x, head_DxV)
    logits = jnp.asarray(rng.standard_normal((rows, cfg.vocab_size)), jnp.float32)
    history = TokenHistory.of_prompts(jnp.zeros((rows, 1), jnp.int32), jnp.ones((rows,), jnp.int32), cfg.vocab_size,
                                      jnp.uint16)
    index = jnp.zeros((rows,), jnp.int32)
    for name, p in (("sample", greedy), ("sample_logprobs", SamplingParams(temperature=0.0, logprobs=5))):
        sampling = RowSampling.of([(p, 0)] * rows)
        out[name] = _ms(jax.jit(lambda l, s: sample(l, s, history, index)), logits, sampling)
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    out["weights_mb"] = weight_bytes / 2**20
    out["step_gb_s"] = weight_bytes / (out["step"] / 1000) / 1e9
    out["loop_step"] = _loop_step_ms(replica, adapter, rows, cache_len, prompt_len)
    replica.close()
    return {k: round(v, 3) for k, v in out.items()}


def _loop_step_ms(replica, adapter, rows: int, cache_len: int, prompt_len: int) -> float:
    """Wall time per decode step of `rows` requests through the scheduler's loop, after their prefill
    (their tokens read by this thread): the step as a request sees it, the loop's own work included."""
    from jaxlora.sampling import SamplingParams

    sched = replica.scheduler
    sched.start()
    rng = np.random.default_rng(1)
    gen = cache_len - prompt_len - 1
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    prompts = [rng.integers(3, 1000, prompt_len).tolist() for _ in range(rows)]
    for _ in range(2):  # the second run is measured
        handles = [sched.submit(p, params, adapter) for p in prompts]
        first = [next(iter(h)) for h in handles]  # every row past its prefill
        t0 = time.perf_counter()
        for h in handles:
            for _ in h:
                pass
        elapsed = time.perf_counter() - t0
    sched.stop()
    del first
    return 1000 * elapsed / (gen - 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cache", type=int, default=256, help="KV cache length per row (prompts fill half of it)")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    args = ap.parse_args(argv)
    model_dir, peft_dirs = bench_model(args.work_dir, 1, args.model)
    results = {}
    for rows in args.rows:
        results[str(rows)] = measure(model_dir, peft_dirs[0], rows, args.cache)
        print(f"{rows} rows: {results[str(rows)]}", flush=True)
    emit({"benchmark": "decode_step_breakdown", "model": args.model, "cache": args.cache, "rows": results,
          "machine": machine()})


if __name__ == "__main__":
    main()
