"""The CPU decode kernel (jaxlora/kernels/bgmv.cc) against its reference loop and XLA's form; its
bits per row; and the engine without it (no compiler) giving the same greedy tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlora import bgmv
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


def test_the_kernel_is_built_on_this_machine():
    """CI has a C++ compiler: the tests below must exercise the kernel, not the fallback."""
    assert bgmv.available()


def test_kernel_equals_reference_loop_and_xla_form():
    rng = np.random.default_rng(0)
    for shape in [dict(), dict(S=9, B=16, D=512, R=16, O=1536), dict(S=2, B=1, D=8, R=1, O=3)]:
        x, a, b, scale, slots = _problem(rng, **shape)
        got = np.asarray(bgmv.bgmv(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), jnp.asarray(slots)))
        for i, s in enumerate(slots):  # the kernel's documented semantics, literally
            want = scale[s] * ((x[i].astype(np.float64) @ a[s]) @ b[s])
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * (np.abs(want).max() + 1))
        assert not got[slots == 0].any()  # the base slot adds exact zeros
        stack = LoraStack(layers=({"q_proj": LoraModule(a=jnp.asarray(a), b=jnp.asarray(b))},), scale=jnp.asarray(scale))
        stack_rows = gather_rows(stack, jnp.asarray(slots))
        xla = lora_delta(jnp.asarray(x)[:, None], stack_rows.layers[0]["q_proj"], stack_rows.scale, None)[:, 0]
        np.testing.assert_allclose(got, np.asarray(xla), rtol=1e-5, atol=1e-5 * (np.abs(got).max() + 1))


def test_a_rows_bits_depend_only_on_its_own_input_and_adapter():
    rng = np.random.default_rng(1)
    x, a, b, scale, slots = _problem(rng, S=6, B=8)
    slots[3] = 2
    first = np.asarray(bgmv.bgmv(*map(jnp.asarray, (x, a, b, scale, slots))))[3]
    # the same adapter in slot 5, different neighbours and other slots' contents
    a2, b2, scale2 = rng.normal(size=a.shape).astype(np.float32), rng.normal(size=b.shape).astype(np.float32), scale.copy()
    a2[5], b2[5], scale2[5] = a[2], b[2], scale[2]
    x2 = rng.normal(size=x.shape).astype(np.float32)
    x2[3] = x[3]
    slots2 = rng.integers(0, 6, size=8).astype(np.int32)
    slots2[3] = 5
    second = np.asarray(bgmv.bgmv(*map(jnp.asarray, (x2, a2, b2, scale2, slots2))))[3]
    assert (first == second).all()


def test_without_a_compiler_decoding_falls_back_with_the_same_tokens(tiny_checkpoints, tmp_path, monkeypatch):
    prompt = [5, 17, 42, 9, 77, 3]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def greedy(root):
        tiny = build_tiny_engine(tiny_checkpoints["llama_gqa"], root)
        sched = tiny.scheduler()
        try:
            return [collect(sched.submit(prompt, params, tiny.adapters[name]))[0] for name in ("a_qv_r4", "b_all_r8_rslora")]
        finally:
            sched.stop()

    with_kernel = greedy(tmp_path / "kernel")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    bgmv._available.cache_clear()
    try:
        assert not bgmv.available()
        assert greedy(tmp_path / "fallback") == with_kernel
    finally:
        monkeypatch.undo()
        bgmv._available.cache_clear()
    assert bgmv.available()


def test_only_float32_weights_use_the_kernel():
    assert bgmv.applies(jnp.float32) and not bgmv.applies(jnp.bfloat16)
