"""LoRA math and formats against PEFT: single adapters, mixed batches, round trips, merging."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.adapter_format import LoraAdapter, read_adapter, write_peft
from jaxlora.tiny_model import random_adapter
from jaxlora.hf_checkpoint import load_params
from jaxlora.lora import LoraModule, LoraStack, lora_delta, zeros_stack
from jaxlora.model import PROJECTIONS, Params, forward, lora_shapes
from jaxlora.slots import SlotCache
from tests.hf_models import LOGIT_TOL
from tests.peft_adapters import ADAPTER_SPECS, load_peft, make_peft_adapter

ARCHS = ["llama_gqa", "qwen2_bias"]
MAX_RANK = 8


@pytest.fixture(scope="module")
def peft_adapters(tiny_checkpoints, tmp_path_factory):
    """arch -> adapter name -> PEFT adapter directory."""
    root = tmp_path_factory.mktemp("peft")
    return {
        arch: {name: make_peft_adapter(tiny_checkpoints[arch], name, root / arch / name, seed=i)
               for i, name in enumerate(ADAPTER_SPECS)}
        for arch in ARCHS
    }


def _slots_for(cfg, adapters: dict[str, LoraAdapter]) -> tuple[SlotCache, dict[str, int]]:
    cache = SlotCache(zeros_stack(lora_shapes(cfg), num_slots=len(adapters) + 1, max_rank=MAX_RANK),
                      loader=lambda r: adapters[r.adapter_id])
    return cache, {name: cache.acquire(ResolvedAdapter("test", name, "v0001", Path("/nowhere"))) for name in adapters}


def _batch(prompts):
    B, T = len(prompts), max(map(len, prompts))
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int64)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
        mask[b, : len(p)] = 1
    return tokens, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), mask


def _prompts(vocab, lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_adapter_matches_peft(tiny_checkpoints, peft_adapters, arch):
    params, cfg = load_params(tiny_checkpoints[arch])
    adapters = {n: read_adapter(d, cfg, MAX_RANK) for n, d in peft_adapters[arch].items()}
    assert adapters["b_all_r8_rslora"].use_rslora
    cache, slot_of = _slots_for(cfg, adapters)
    peft_model = load_peft(tiny_checkpoints[arch], peft_adapters[arch])
    prompt = _prompts(cfg.vocab_size, [9])[0]
    base, _ = forward(params, np.array([prompt]), np.arange(9)[None], cfg)
    for name in adapters:
        ours, _ = forward(params, np.array([prompt]), np.arange(9)[None], cfg, lora=cache.stack,
                          slots_B=np.array([slot_of[name]]))
        peft_model.set_adapter(name)
        with torch.no_grad():
            ref = peft_model(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(np.asarray(ours[0]) - ref).max() <= LOGIT_TOL, name  # measured <= 2.0e-5
        assert np.abs(np.asarray(ours[0]) - np.asarray(base[0])).max() > 1e-2, f"{name} changes nothing"


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_rows_alone_and_peft_mixed_batch(tiny_checkpoints, peft_adapters, arch):
    params, cfg = load_params(tiny_checkpoints[arch])
    adapters = {n: read_adapter(d, cfg, MAX_RANK) for n, d in peft_adapters[arch].items()}
    cache, slot_of = _slots_for(cfg, adapters)
    row_adapters = ["__base__", "a_qv_r4", "b_all_r8_rslora", "c_mlp_r2", "a_qv_r4", "__base__"]
    slots = np.array([slot_of.get(n, 0) for n in row_adapters], np.int32)
    prompts = _prompts(cfg.vocab_size, [5, 11, 8, 3, 11, 7], seed=1)
    tokens, positions, mask = _batch(prompts)
    mixed, _ = forward(params, tokens, positions, cfg, lora=cache.stack, slots_B=slots)
    for b in range(len(prompts)):
        # "Alone" at the mixed batch's shape (every row on row b's adapter): XLA's matmul bits depend
        # on the number of rows (1-row batches differed by 1.4e-5), so only equal shapes are bitwise.
        alone, _ = forward(params, tokens, positions, cfg, lora=cache.stack, slots_B=np.full_like(slots, slots[b]))
        np.testing.assert_array_equal(np.asarray(mixed[b]), np.asarray(alone[b]))
    peft_model = load_peft(tiny_checkpoints[arch], peft_adapters[arch])
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                         adapter_names=row_adapters).logits.numpy()
    for b, p in enumerate(prompts):
        assert np.abs(np.asarray(mixed[b, : len(p)]) - ref[b, : len(p)]).max() <= LOGIT_TOL  # measured <= 1.7e-5


def test_lora_delta_equals_reference_loop():
    rng = np.random.default_rng(0)
    S, B, T, D, R, O = 4, 5, 3, 6, 2, 7
    mod = LoraModule(a=jnp.asarray(rng.normal(size=(S, D, R)), jnp.float32), b=jnp.asarray(rng.normal(size=(S, R, O)), jnp.float32))
    scale = np.array([0.0, 0.5, 2.0, 1.5], np.float32)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    slots = np.array([2, 0, 3, 2, 1], np.int32)
    got = np.asarray(lora_delta(jnp.asarray(x), mod, jnp.asarray(scale), jnp.asarray(slots)))
    a, b = np.asarray(mod.a, np.float64), np.asarray(mod.b, np.float64)
    for i in range(B):  # the docstring's semantics, literally, in float64
        s = slots[i]
        want = scale[s] * ((x[i] @ a[s]) @ b[s])
        # float32 sums of D then R products, in any order, FMA or not: within (D + R + 2) u of the
        # products' magnitudes (u = 2^-24), on any host.
        bound = (D + R + 2) * 2.0**-24 * scale[s] * ((np.abs(x[i]) @ np.abs(a[s])) @ np.abs(b[s]))
        assert (np.abs(got[i] - want) <= bound).all(), i


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_one_slot_path_and_its_gradient_equal_the_plain_formula(dtype, tol):
    """Training's one-slot stack takes a path with a hand-written gradient; value and gradients
    (input, A, B, scale) must equal JAX's own derivative of scale * (x @ a) @ b, in float32 and
    in the bfloat16 compute of mixed-precision training."""
    import jax

    rng = np.random.default_rng(1)
    B, T, D, R, O = 3, 5, 6, 2, 7
    x = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    a, b = jnp.asarray(rng.normal(size=(1, D, R)), dtype), jnp.asarray(rng.normal(size=(1, R, O)), dtype)
    scale = jnp.asarray([1.7], jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(B, T, O)), jnp.float32)

    def ours(x, a, b, scale):
        return jnp.sum(lora_delta(x, LoraModule(a=a, b=b), scale, jnp.zeros((B,), jnp.int32)) * cotangent)

    def plain(x, a, b, scale):
        return jnp.sum((((x @ a[0]) * scale[0].astype(dtype)) @ b[0]) * cotangent)

    f32 = lambda v: np.asarray(jnp.asarray(v, jnp.float32))  # noqa: E731
    # Hand-written vs JAX's own derivative: the same products, summed (over at most B*T = 15 terms) in
    # other orders, a few ulps apart on any host; far inside tol (measured 0.3% of it; bf16: equal bits).
    np.testing.assert_allclose(f32(ours(x, a, b, scale)), f32(plain(x, a, b, scale)), rtol=tol)
    for got, want in zip(jax.grad(ours, argnums=(0, 1, 2, 3))(x, a, b, scale), jax.grad(plain, argnums=(0, 1, 2, 3))(x, a, b, scale)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(f32(got), f32(want), rtol=tol, atol=tol * (np.abs(f32(want)).max() + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_written_adapter_loads_in_peft_with_equal_logits(tiny_checkpoints, tmp_path, arch):
    params, cfg = load_params(tiny_checkpoints[arch])
    ours = random_adapter(cfg, r=4, alpha=6, modules=("k_proj", "up_proj", "down_proj"), seed=3, use_rslora=True)
    write_peft(ours, tmp_path / "ours", base_model="tiny")
    again = read_adapter(tmp_path / "ours", cfg, MAX_RANK)
    assert again.weights.keys() == ours.weights.keys() and again.scale == ours.scale
    cache, slot_of = _slots_for(cfg, {"ours": ours})
    peft_model = load_peft(tiny_checkpoints[arch], {"ours": tmp_path / "ours"})
    prompt = _prompts(cfg.vocab_size, [7], seed=4)[0]
    got, _ = forward(params, np.array([prompt]), np.arange(7)[None], cfg, lora=cache.stack, slots_B=np.array([slot_of["ours"]]))
    with torch.no_grad():
        ref = peft_model(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(np.asarray(got[0]) - ref).max() <= LOGIT_TOL  # measured <= 5.0e-6


def test_legacy_params_json_equals_peft(tiny_checkpoints, peft_adapters, tmp_path):
    params, cfg = load_params(tiny_checkpoints["llama_gqa"])
    peft_ad = read_adapter(peft_adapters["llama_gqa"]["a_qv_r4"], cfg, MAX_RANK)
    legacy = {"lora_alpha": peft_ad.alpha, "r": peft_ad.r}
    for (layer, module), (a, b) in peft_ad.weights.items():
        path = f"model.layers.{layer}.self_attn.{module}"
        legacy[f"{path}.A"], legacy[f"{path}.B"] = a.tolist(), b.tolist()
    (tmp_path / "params.json").write_text(json.dumps(legacy))
    old = read_adapter(tmp_path, cfg, MAX_RANK)
    assert old.scale == peft_ad.scale
    for k, (a, b) in peft_ad.weights.items():
        np.testing.assert_array_equal(old.weights[k][0], a)
        np.testing.assert_array_equal(old.weights[k][1], b)


def _merge(params: Params, stack: LoraStack, slot: int) -> Params:
    """The base params with one slot's adapter folded into the weights, W + scale * a @ b: the
    model a replica serving a single adapter could run, with no LoRA stack at all."""
    scale = stack.scale[slot]
    layers = []
    for lp, lora_layer in zip(params.layers, stack.layers):
        updates = {}
        for m, mod in lora_layer.items():
            field = PROJECTIONS[m].weight
            w = getattr(lp, field)
            delta = scale * (mod.a[slot].astype(jnp.float32) @ mod.b[slot].astype(jnp.float32))
            updates[field] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        layers.append(dataclasses.replace(lp, **updates))
    return dataclasses.replace(params, layers=tuple(layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_equal_lora_forward(tiny_checkpoints, peft_adapters, arch):
    params, cfg = load_params(tiny_checkpoints[arch])
    ad = read_adapter(peft_adapters[arch]["b_all_r8_rslora"], cfg, MAX_RANK)
    cache, slot_of = _slots_for(cfg, {"b": ad})
    prompt = _prompts(cfg.vocab_size, [10], seed=5)[0]
    tok, pos = np.array([prompt]), np.arange(10)[None]
    with_lora, _ = forward(params, tok, pos, cfg, lora=cache.stack, slots_B=np.array([slot_of["b"]]))
    merged, _ = forward(_merge(params, cache.stack, slot_of["b"]), tok, pos, cfg)
    # W + s*A@B rounds each weight once more than x@W + s*(x@A)@B does, a summation-order-sized
    # difference; measured <= 3.4e-5 (qwen2_bias, whose rsLoRA adapter outweighs W) at logits ~4.
    assert np.abs(np.asarray(merged) - np.asarray(with_lora)).max() <= LOGIT_TOL


def test_zero_slot_is_the_base_model(tiny_checkpoints):
    params, cfg = load_params(tiny_checkpoints["llama_gqa"])
    stack = zeros_stack(lora_shapes(cfg), num_slots=3, max_rank=4)
    prompt = np.array([_prompts(cfg.vocab_size, [6])[0]])
    base, _ = forward(params, prompt, np.arange(6)[None], cfg)
    slot0, _ = forward(params, prompt, np.arange(6)[None], cfg, lora=stack, slots_B=np.array([0]))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(slot0))
