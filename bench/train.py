"""LoRA SFT training throughput: ours (JAX + Optax) vs PEFT + transformers (PyTorch), same run.

    python -m bench.train [--steps 10] [--batch 8] [--seq 128]

8-layer, 512-wide Llama (the engine benchmark's), rank-16 LoRA on all seven projections, AdamW,
batch 8 x 128 tokens, every token trained, float32 on both sides. Each side runs 2 warm-up steps,
then `--steps` timed steps (forward, backward, optimizer update). Also measures both frameworks'
float32 matmul throughput on the step's projection shapes (`matmul_gflops`): the ceiling that any
step made of those matmuls runs under. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import build_model, emit, machine


def run_ours(model_dir: Path, batch: dict, steps: int) -> float:
    import jax

    from jaxlora.hf_checkpoint import load_params
    from jaxlora.model import PROJECTIONS
    from training.spec import TrainSpec
    from training.trainer import _train_step, init_lora, make_optimizer

    params, cfg = load_params(model_dir)
    spec = TrainSpec(user_id="bench", adapter_id="bench", data="-", steps=steps, learning_rate=1e-4,
                     lora={"r": 16, "alpha": 32, "target_modules": list(PROJECTIONS)})
    optimizer = make_optimizer(spec, steps + 2)
    trainable = init_lora(cfg, spec, jax.random.PRNGKey(0))
    opt_state = optimizer.init(trainable)
    step = jax.jit(functools.partial(_train_step, cfg=cfg, spec=spec, optimizer=optimizer), donate_argnums=(0, 1))
    key = jax.random.PRNGKey(1)
    for _ in range(2):
        trainable, opt_state, loss, _ = step(trainable, opt_state, params, batch, key)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, loss, _ = step(trainable, opt_state, params, batch, key)
    jax.block_until_ready(loss)
    return steps * batch["mask"].size / (time.perf_counter() - t0)


def run_peer(model_dir: Path, batch: dict, steps: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxlora.model import PROJECTIONS

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=list(PROJECTIONS), lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # transformers shifts labels itself: give it the full sequence, tokens then the last target.
    ids = torch.tensor(np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1), dtype=torch.long)

    def one():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * batch["mask"].size / (time.perf_counter() - t0)


def matmul_gflops(tokens: int, repeats: int = 10) -> dict:
    """Best-of float32 GFLOP/s of `[tokens, in] @ [in, out]` for the step's projection shapes."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    out = {"jax": {}, "torch": {}}
    for d_in, d_out in [(512, 1536), (1536, 512), (512, 8192)]:
        x = rng.standard_normal((tokens, d_in)).astype(np.float32)
        w = rng.standard_normal((d_in, d_out)).astype(np.float32)
        flops = 2 * tokens * d_in * d_out
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        mm = jax.jit(lambda a, b: a @ b)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        for name, run in [("jax", lambda: mm(xj, wj).block_until_ready()), ("torch", lambda: xt @ wt)]:
            run()  # warm-up: compilation, thread pools, first-touch of the output
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
            out[name][f"{tokens}x{d_in}@{d_in}x{d_out}"] = round(flops / best / 1e9)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "jaxlora-bench"))
    args = ap.parse_args(argv)
    model_dir = build_model(Path(args.work_dir) / "llama8x512")
    rng = np.random.default_rng(0)
    seq = rng.integers(3, 8192, size=(args.batch, args.seq + 1)).astype(np.int32)
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones((args.batch, args.seq), np.float32)}
    ours = run_ours(model_dir, batch, args.steps)
    print(f"ours: {ours:.0f} tokens/s", flush=True)
    peer = run_peer(model_dir, batch, args.steps)
    print(f"peer (peft + transformers, torch AdamW): {peer:.0f} tokens/s", flush=True)
    peaks = matmul_gflops(args.batch * args.seq)
    emit({"benchmark": "lora_sft_training", "batch": args.batch, "seq": args.seq, "steps": args.steps,
          "ours_tok_s": round(ours, 1), "peer_tok_s": round(peer, 1), "ratio": round(ours / peer, 2),
          "matmul_gflops": peaks, "machine": machine()})


if __name__ == "__main__":
    main()
