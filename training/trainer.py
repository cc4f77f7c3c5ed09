"""`train(spec)`: LoRA fine-tuning (SFT or DPO) with JAX + Optax, resumable, published
atomically to the adapter store. No Ray here (see `training.ray_entry`).

The trained parameters are a one-slot `LoraStack` (slot 0 is the adapter being trained) over the
frozen base params: the same model and LoRA code that serving runs, so what is trained is exactly
what is served. DPO's reference policy is the same model with no adapter.

Phases of `train`:
  1. load the base model and tokenizer, read and validate all data (errors before any compute);
  2. initialise LoRA as PEFT does (A ~ U(+-1/sqrt(in)), B = 0), or restore the last checkpoint;
  3. loop over optimizer steps: `grad_accum_steps` micro-batches each (optax.MultiSteps), AdamW
     with warm-up + cosine, global-norm clipping; float32 master weights, bf16 compute if asked;
     checkpoint every `checkpoint_every` steps (params, optimizer state, step and seed: the step fixes
     the data position and the RNG keys, so a resumed run replays exactly);
  4. publish a new version (PEFT files, manifest with config, data sha256, loss curve and final
     loss, and a loss-curve PNG) and return where it went.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from jaxlora.adapter_format import LoraAdapter, read_published, write_peft
from jaxlora.adapter_store import AdapterStore
from jaxlora.config import ModelConfig
from jaxlora.demo import default_model
from jaxlora.hf_checkpoint import load_params, model_fingerprint, model_name
from jaxlora.lora import LoraModule, LoraStack, lora_scale
from jaxlora.model import PROJECTIONS, Params, forward
from jaxlora.tokenizer import load_tokenizer
from training.data import Batch, BatchStream, load_dataset
from training.losses import dpo_loss, sequence_logprobs, sft_loss
from training.plot import loss_curve_png
from training.spec import TrainSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    user_id: str
    adapter_id: str
    version: str
    path: str
    final_loss: float
    steps: int
    resumed_from_step: int
    trained_tokens: int = 0  # the tokens of every row trained on, each time it was (padding not counted)


class TrainHooks:
    """What a caller (a fine-tuning job) hears during `train_with_hooks`; any hook may raise to stop
    the run (the checkpoint stays, nothing is published)."""

    def on_log(self, step: int, total: int, loss: float, tokens_per_s: float, valid_loss: float | None) -> None:
        pass

    def on_checkpoint(self, step: int, loss: float) -> None:
        pass

    def before_publish(self) -> None:
        pass


def init_lora(cfg: ModelConfig, spec: TrainSpec, key: jax.Array) -> tuple[dict[str, LoraModule], ...]:
    """PEFT's default init: A kaiming-uniform (bound 1/sqrt(in)), B zeros; one slot per module."""
    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for j, m in enumerate(spec.lora.target_modules):
            d_in, d_out = PROJECTIONS[m].shape(cfg)
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(jax.random.fold_in(key, i * 16 + j), (1, d_in, spec.lora.r), jnp.float32, -bound, bound)
            layer[m] = LoraModule(a=a, b=jnp.zeros((1, spec.lora.r, d_out), jnp.float32))
        layers.append(layer)
    return tuple(layers)


def from_adapter(adapter: LoraAdapter, cfg: ModelConfig, spec: TrainSpec) -> tuple[dict[str, LoraModule], ...]:
    """The trainable tree of an existing adapter (training further from it); it must be the spec's LoRA."""
    want = (spec.lora.r, float(spec.lora.alpha), spec.lora.use_rslora, tuple(sorted(spec.lora.target_modules)))
    have = (adapter.r, float(adapter.alpha), adapter.use_rslora, adapter.target_modules)
    if want != have:
        raise ValueError(f"init_adapter has r, alpha, rslora, targets {have}; the spec asks for {want}")
    return tuple({m: LoraModule(a=jnp.asarray(adapter.weights[(i, m)][0])[None], b=jnp.asarray(adapter.weights[(i, m)][1])[None])
                  for m in spec.lora.target_modules} for i in range(cfg.num_layers))


def to_adapter(layers: tuple[dict[str, LoraModule], ...], spec: TrainSpec) -> LoraAdapter:
    weights = {(i, m): (np.asarray(mod.a[0], np.float32), np.asarray(mod.b[0], np.float32))
               for i, layer in enumerate(layers) for m, mod in layer.items()}
    return LoraAdapter(r=spec.lora.r, alpha=spec.lora.alpha, use_rslora=spec.lora.use_rslora, weights=weights)


def make_optimizer(spec: TrainSpec, total_steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.learning_rate, warmup_steps=min(spec.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, 1), end_value=spec.learning_rate * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(spec.clip_norm), optax.adamw(schedule, weight_decay=spec.weight_decay))
    return optax.MultiSteps(opt, every_k_schedule=spec.grad_accum_steps)


def loss_fn(trainable: tuple, params: Params, batch: dict, key: jax.Array, cfg: ModelConfig, spec: TrainSpec):
    """(loss, aux) of one micro-batch; only `trainable` (the LoRA A/B of each layer) is
    differentiated: the base weights and the scale alpha/r are constants."""
    compute = jnp.bfloat16 if spec.precision == "bf16" else jnp.float32
    scale = jnp.full((1,), lora_scale(spec.lora.alpha, spec.lora.r, spec.lora.use_rslora), jnp.float32)
    lora = LoraStack(layers=jax.tree.map(lambda x: x.astype(compute), trainable), scale=scale)
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    slots = jnp.zeros((tokens.shape[0],), jnp.int32)
    dropout = (key, spec.lora.dropout) if spec.lora.dropout > 0 else None
    logits, _ = forward(params, tokens, positions, cfg, lora=lora, slots_B=slots, lora_dropout=dropout)
    if spec.objective == "sft":
        return sft_loss(logits, targets, mask), jnp.float32(0)
    ref_logits, _ = forward(params, tokens, positions, cfg)  # the base model: the reference policy
    ref = jax.lax.stop_gradient(sequence_logprobs(ref_logits, targets, mask))
    return dpo_loss(sequence_logprobs(logits, targets, mask), ref, spec.dpo_beta)


def _train_step(trainable, opt_state, params, batch, key, cfg, spec, optimizer):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, batch, key, cfg, spec)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, aux


# -- checkpoints: safetensors for arrays, JSON for the rest (never pickle) --------------------------

def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{i:05d}:{jax.tree_util.keystr(path)}": np.asarray(leaf) for i, (path, leaf) in enumerate(leaves)}


def save_checkpoint(folder: Path, trainable, opt_state, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {f"lora/{k}": v for k, v in _flat(trainable).items()} | {f"opt/{k}": v for k, v in _flat(opt_state).items()}
    save_file(arrays, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta))
    final = folder / "last"
    old = folder / ".old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, trainable, opt_state):
    """(trainable, opt_state, meta) from `folder/last`, or None; the trees give structure and dtypes."""
    last = folder / "last"
    if not (last / "meta.json").is_file():
        return None
    arrays = load_file(last / "state.safetensors")

    def restore(tree, prefix):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        names = sorted(k for k in arrays if k.startswith(prefix))
        if len(names) != len(leaves):
            raise ValueError(f"checkpoint {last} does not match this spec (different LoRA or optimizer shape)")
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n], dtype=leaf.dtype) for n, leaf in zip(names, leaves)])

    return restore(trainable, "lora/"), restore(opt_state, "opt/"), json.loads((last / "meta.json").read_text())


def train(spec: TrainSpec) -> TrainResult:
    """Trains one adapter and publishes it as a new version (resuming from its last checkpoint)."""
    return train_with_hooks(spec, TrainHooks())


def train_with_hooks(spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
    result = _train(spec, hooks=hooks)
    assert result is not None
    return result


def _train(spec: TrainSpec, stop_after_steps: int | None = None, hooks: TrainHooks = TrainHooks()) -> TrainResult | None:
    """`train`, with a seam for tests: `stop_after_steps` ends the run right after a checkpoint,
    as a killed task would, and returns None."""
    # 1. everything that can fail on bad input, before any compute
    model_dir = Path(spec.model_dir) if spec.model_dir else default_model()
    tokenizer = load_tokenizer(model_dir)
    params, cfg = load_params(model_dir, jnp.bfloat16 if spec.precision == "bf16" else jnp.float32)
    data = load_dataset(spec.data, tokenizer, spec.objective, spec.max_length)
    stream = BatchStream(data, spec.batch_size, spec.max_length, spec.seed)
    total = spec.steps or max(1, math.ceil(spec.epochs * stream.per_epoch / spec.grad_accum_steps))
    total = min(total, spec.max_steps or total)
    optimizer = make_optimizer(spec, total)
    valid = None
    if spec.validation_data:
        v = load_dataset(spec.validation_data, tokenizer, spec.objective, spec.max_length)
        valid = BatchStream(v, min(spec.batch_size, len(v)), spec.max_length, spec.seed)

    # 2. initial state, or the last checkpoint
    key = jax.random.PRNGKey(spec.seed)
    if spec.init_adapter:
        trainable = from_adapter(read_published(Path(spec.init_adapter), cfg, spec.lora.r), cfg, spec)
    else:
        trainable = init_lora(cfg, spec, jax.random.fold_in(key, 0))
    opt_state = optimizer.init(trainable)
    ckpt_dir = spec.checkpoint_path()
    step, losses = 0, []
    restored = load_checkpoint(ckpt_dir, trainable, opt_state)
    if restored is not None:
        trainable, opt_state, meta = restored
        if meta["seed"] != spec.seed:  # another seed orders the data differently: not a resume
            raise ValueError(f"checkpoint in {ckpt_dir} was made with seed {meta['seed']}, this spec has "
                             f"seed {spec.seed}; use the same seed or remove the checkpoint")
        step, losses = meta["step"], meta["losses"]
        log.info("resuming %s/%s from step %d", spec.user_id, spec.adapter_id, step)
    resumed_from = step

    # 3. the loop; micro-batch index and dropout keys derive from the step, so resuming replays exactly
    train_step = jax.jit(functools.partial(_train_step, cfg=cfg, spec=spec, optimizer=optimizer),
                         donate_argnums=(0, 1))
    no_dropout = spec.model_copy(update={"lora": spec.lora.model_copy(update={"dropout": 0.0})})
    eval_step = jax.jit(lambda t, p, b, k: loss_fn(t, p, b, k, cfg, no_dropout)[0])
    t0, tokens_seen = time.perf_counter(), 0
    trained_tokens = stream.tokens_before(step * spec.grad_accum_steps)
    while step < total:
        step_losses = []
        for micro in range(spec.grad_accum_steps):
            i = step * spec.grad_accum_steps + micro
            batch: Batch = stream[i]
            trainable, opt_state, loss, _ = train_step(
                trainable, opt_state, params, batch.arrays(), jax.random.fold_in(key, 1 + i))
            step_losses.append(float(loss))
            tokens_seen += int(batch.mask.size)
            trained_tokens += batch.tokens_in_rows
        step += 1
        losses.append(float(np.mean(step_losses)))
        if step % spec.log_every == 0 or step == total:
            rate = tokens_seen / (time.perf_counter() - t0)
            valid_loss = None if valid is None else validation_loss(eval_step, trainable, params, valid, key)
            print(f"[{spec.user_id}/{spec.adapter_id}] step {step}/{total} loss {losses[-1]:.4f} "
                  f"tokens/s {rate:.0f}" + ("" if valid_loss is None else f" validation loss {valid_loss:.4f}"), flush=True)
            hooks.on_log(step, total, losses[-1], rate, valid_loss)
        if step % spec.checkpoint_every == 0 or step == total:
            save_checkpoint(ckpt_dir, trainable, opt_state, {"step": step, "losses": losses, "seed": spec.seed})
            hooks.on_checkpoint(step, losses[-1])
        if stop_after_steps is not None and step >= stop_after_steps and step < total:
            return None
    hooks.before_publish()

    # 4. publish
    adapter = to_adapter(trainable, spec)
    store = AdapterStore(spec.fs_root)
    base = {"name": model_name(model_dir), "fingerprint": model_fingerprint(model_dir)}

    def write(folder: Path) -> None:
        write_peft(adapter, folder, base_model=base["name"])
        loss_curve_png(losses, folder / "loss_curve.png")

    published = store.publish(spec.user_id, spec.adapter_id, write, base_model=base, extra_manifest={
        "training": {"spec": spec.model_dump(), "data_sha256": data.sha256, "loss_curve": losses,
                     "final_loss": losses[-1], "steps": total, "resumed_from_step": resumed_from}})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is done; a new run starts fresh
    print(f"[{spec.user_id}/{spec.adapter_id}] published {published.version} at {published.path}", flush=True)
    return TrainResult(spec.user_id, spec.adapter_id, published.version, str(published.path), losses[-1], total,
                       resumed_from, trained_tokens)


def validation_loss(eval_step, trainable, params: Params, valid: BatchStream, key) -> float:
    """The mean loss over one pass of the validation batches (no dropout, no update)."""
    return float(np.mean([float(eval_step(trainable, params, valid[i].arrays(), key)) for i in range(valid.per_epoch)]))
