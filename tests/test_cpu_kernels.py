"""The CPU decode kernels (jaxlora/kernels/*.cc) against their reference loops and XLA's forms; their
bits per row; and the engine without them (no compiler) giving the same greedy tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlora import kernels
from jaxlora.engine import Engine, EngineConfig
from jaxlora.hf_checkpoint import load_params
from jaxlora.model import attention, visible
from jaxlora.lora import LoraModule, LoraStack, gather_rows, lora_delta
from jaxlora.sampling import SamplingParams
from tests.engine_fixtures import build_tiny_engine, collect


def _problem(rng, S=5, B=7, D=48, R=4, O=24):
    a = rng.normal(size=(S, D, R)).astype(np.float32)
    b = rng.normal(size=(S, R, O)).astype(np.float32)
    a[0], b[0] = 0, 0  # slot 0: the base model
    scale = rng.random(S).astype(np.float32) + 0.5
    x = rng.normal(size=(B, D)).astype(np.float32)
    slots = rng.integers(0, S, size=B).astype(np.int32)
    return x, a, b, scale, slots


def test_the_kernels_are_built_on_this_machine():
    """CI has a C++ compiler: the tests below must exercise the kernels, not the fallback."""
    assert kernels.available()


def test_kernel_equals_reference_loop_and_xla_form():
    rng = np.random.default_rng(0)
    for shape in [dict(), dict(S=9, B=16, D=512, R=16, O=1536), dict(S=2, B=1, D=8, R=1, O=3)]:
        x, a, b, scale, slots = _problem(rng, **shape)
        got = np.asarray(kernels.bgmv(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), jnp.asarray(slots)))
        # The kernel does the same float32 operations in one order in every ISA build and the reference
        # is float64, so its error here (measured <= 4% of the bound) is its error on any x86-64 host.
        for i, s in enumerate(slots):  # the kernel's documented semantics, literally
            want = scale[s] * ((x[i].astype(np.float64) @ a[s]) @ b[s])
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * (np.abs(want).max() + 1))
        assert not got[slots == 0].any()  # the base slot adds exact zeros
        stack = LoraStack(layers=({"q_proj": LoraModule(a=jnp.asarray(a), b=jnp.asarray(b))},), scale=jnp.asarray(scale))
        stack_rows = gather_rows(stack, jnp.asarray(slots))
        xla = lora_delta(jnp.asarray(x)[:, None], stack_rows.layers[0]["q_proj"], stack_rows.scale, None)[:, 0]
        # XLA sums the same <= 528 products in its own order, a few ulps off (measured <= 4.4% of the bound).
        np.testing.assert_allclose(got, np.asarray(xla), rtol=1e-5, atol=1e-5 * (np.abs(got).max() + 1))


def test_a_rows_bits_depend_only_on_its_own_input_and_adapter():
    rng = np.random.default_rng(1)
    x, a, b, scale, slots = _problem(rng, S=6, B=8)
    slots[3] = 2
    first = np.asarray(kernels.bgmv(*map(jnp.asarray, (x, a, b, scale, slots))))[3]
    # the same adapter in slot 5, different neighbours and other slots' contents
    a2, b2, scale2 = rng.normal(size=a.shape).astype(np.float32), rng.normal(size=b.shape).astype(np.float32), scale.copy()
    a2[5], b2[5], scale2[5] = a[2], b[2], scale[2]
    x2 = rng.normal(size=x.shape).astype(np.float32)
    x2[3] = x[3]
    slots2 = rng.integers(0, 6, size=8).astype(np.int32)
    slots2[3] = 5
    second = np.asarray(kernels.bgmv(*map(jnp.asarray, (x2, a2, b2, scale2, slots2))))[3]
    assert (first == second).all()


def test_without_a_compiler_decoding_falls_back_with_the_same_tokens(tiny_checkpoints, tmp_path, monkeypatch):
    prompt = [5, 17, 42, 9, 77, 3]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def greedy(root):
        tiny = build_tiny_engine(tiny_checkpoints["llama_gqa"], root)
        sched = tiny.scheduler()
        try:
            tokens = [collect(sched.submit(prompt, params, tiny.adapters[name]))[0] for name in ("a_qv_r4", "b_all_r8_rslora")]
            return tiny.engine.decode_kernels, tokens
        finally:
            sched.stop()

    with_kernel = greedy(tmp_path / "kernel")
    assert with_kernel[0]
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    kernels._available.cache_clear()
    try:
        assert not kernels.available()
        assert greedy(tmp_path / "fallback") == (False, with_kernel[1])
    finally:
        monkeypatch.undo()
        kernels._available.cache_clear()
    assert kernels.available()


def test_only_float32_uses_the_kernels(tiny_checkpoints):
    assert kernels.applies(jnp.float32) and not kernels.applies(jnp.bfloat16)
    params, cfg = load_params(tiny_checkpoints["llama_gqa"])
    assert Engine(params, cfg, EngineConfig()).decode_kernels
    params, cfg = load_params(tiny_checkpoints["llama_gqa"], jnp.bfloat16)
    assert not Engine(params, cfg, EngineConfig(dtype="bfloat16")).decode_kernels


def _attention_problem(rng, B=6, K=2, G=2, S=24, H=32):
    q = rng.normal(size=(B, K * G, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    return q, k, v


def _xla_attention(q, k, v, positions, window):
    vis = visible(jnp.asarray(positions)[:, None], jnp.arange(k.shape[2])[None, :], window)
    return np.asarray(attention(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v), vis))[:, 0]


def test_decode_attention_equals_reference_loop_and_xla_form():
    rng = np.random.default_rng(2)
    cases = [  # (B, K, G, S, H, window, q scale): GQA, MHA, a head size with a tail (40 = 2 * 16 + 8),
        # sliding windows, and scores spread over ~[-150, 150] (the kernel's own exp over its whole range)
        (6, 2, 2, 24, 32, None, 1), (16, 4, 2, 128, 64, None, 1), (3, 3, 1, 17, 40, None, 1), (5, 2, 4, 32, 16, 7, 1),
        (4, 1, 8, 9, 128, 1, 1), (8, 2, 2, 64, 64, None, 20),
    ]
    for B, K, G, S, H, window, q_scale in cases:
        q, k, v = _attention_problem(rng, B, K, G, S, H)
        q *= q_scale
        positions = rng.integers(0, S, size=B).astype(np.int32)
        positions[0], positions[-1] = 0, S - 1  # the first and the last cache entry
        got = np.asarray(kernels.decode_attention(*map(jnp.asarray, (q, k, v, positions)), window))
        # Host-independent kernel bits vs float64, as for BGMV (measured <= 11% of the bound), and vs
        # XLA's form in its own order (<= 25%, at scores of +-150 where one ulp of a score is 1.5e-5).
        for b in range(B):  # the kernel's documented semantics, literally
            for n in range(K * G):
                seen = [s for s in range(S) if s <= positions[b] and (window is None or s > positions[b] - window)]
                scores = np.array([q[b, n].astype(np.float64) @ k[b, n // G, s] for s in seen]) / np.sqrt(H)
                w = np.exp(scores - scores.max())
                want = (w / w.sum()) @ v[b, n // G, seen].astype(np.float64)
                np.testing.assert_allclose(got[b, n], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, _xla_attention(q, k, v, positions, window), rtol=1e-5, atol=1e-5)


def test_decode_attention_of_free_rows_matches_xla_past_the_cache_end():
    """Free decode rows keep counting positions past the cache end: such a row sees the whole cache
    (clipped to its window), and a row that sees nothing gets NaN, exactly where XLA's form does."""
    rng = np.random.default_rng(3)
    q, k, v = _attention_problem(rng, B=4, S=8)
    for window, positions in [(None, [8, 30, 7, -1]), (3, [9, 10, 8, 40]), (1, [7, 8, 0, -2])]:
        positions = np.array(positions, np.int32)
        got = np.asarray(kernels.decode_attention(*map(jnp.asarray, (q, k, v, positions)), window))
        want = _xla_attention(q, k, v, positions, window)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NaNs compare equal; measured <= 2%
    assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()


def test_a_new_build_replaces_older_ones_in_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "jaxlora" / "kernels"
    cache.mkdir(parents=True)
    (cache / "kernels-0000000000000000.so").write_bytes(b"an older build")
    (cache / "bgmv-0000000000000000.so").write_bytes(b"a build of the earlier single kernel")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels._available.cache_clear()
    try:
        assert kernels.available()
        assert [p.name.startswith("kernels-") and p.suffix == ".so" for p in cache.iterdir()] == [True]
    finally:
        monkeypatch.undo()
        kernels._available.cache_clear()
    assert kernels.available()


def test_decode_attention_bits_of_a_row_depend_only_on_its_own_cache():
    rng = np.random.default_rng(4)
    q, k, v = _attention_problem(rng, B=8, S=40, H=64)
    positions = rng.integers(0, 40, size=8).astype(np.int32)
    first = np.asarray(kernels.decode_attention(*map(jnp.asarray, (q, k, v, positions)), None))[5]
    # the same row at another index, with other neighbours, other positions and junk past its position
    q2, k2, v2 = _attention_problem(rng, B=11, S=40, H=64)
    positions2 = rng.integers(0, 40, size=11).astype(np.int32)
    q2[2], positions2[2] = q[5], positions[5]
    k2[2, :, : positions[5] + 1], v2[2, :, : positions[5] + 1] = k[5, :, : positions[5] + 1], v[5, :, : positions[5] + 1]
    second = np.asarray(kernels.decode_attention(*map(jnp.asarray, (q2, k2, v2, positions2)), None))[2]
    assert (first == second).all()
