"""BGMV on CPU: a decode step's per-row LoRA products as one small C++ kernel (`kernels/bgmv.cc`),
called through XLA's FFI.

Why: in a decode step each row multiplies one token by its own adapter, `[1, D] @ [D, R]` then
`[1, R] @ [R, O]`. XLA:CPU has no good form for that. As batched dots over per-row copies of the
weights (`lora.gather_rows`) they run single-threaded and read every adapter once per row that
uses it; as one matmul over all slots they are not bit-stable (a row's bits then depend on which
slot its adapter sits in). The kernel reads each row's slot in place, in a fixed order. Measured
on the 8-layer, 512-wide benchmark model, 16 rows over 8 adapters: the LoRA share of a decode
step fell from ~9 ms to ~4 ms (docs/benchmarks.md).

How: built on first use with the system C++ compiler (`c++`, or `$CXX`) against the FFI headers
that jaxlib ships (`jax.ffi.include_dir()`), into a per-user cache folder keyed by the source and
the jaxlib version (never on the adapter filesystem), then registered as an FFI target. Without a
compiler, on another backend, or for bfloat16 weights, `lora.lora_delta`'s XLA form runs instead:
same semantics, and the tests compare the two.

What it deliberately does not do: prefill (many tokens per row, where XLA's batched matmuls are
good), gradients (training never calls it), dtypes other than float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "kernels" / "bgmv.cc"
_TARGET = "jaxlora_bgmv"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlora" / "kernels"


def _build() -> Path:
    """The compiled kernel, compiling it unless this source and jaxlib version already were."""
    tag = hashlib.sha256(_SOURCE.read_bytes() + jaxlib.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"bgmv-{tag}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir(),
               str(_SOURCE), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)  # concurrent builders each write their own file; the last rename wins
    return lib


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered for the CPU backend in use (builds it once)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("BGMV kernel not available (%s); decoding uses XLA's batched dots instead", detail)
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JaxloraBgmv), platform="cpu")
    return True


def applies(dtype) -> bool:
    """Whether decoding with LoRA weights of `dtype` uses the kernel."""
    return jnp.dtype(dtype) == jnp.float32 and available()


def bgmv(x_BxD: jax.Array, a_SxDxR: jax.Array, b_SxRxO: jax.Array, scale_S: jax.Array, slots_B: jax.Array) -> jax.Array:
    """y[i] = scale[s] * ((x[i] @ a[s]) @ b[s]) with s = slots[i]; float32 [B, O]."""
    if not available():
        raise RuntimeError("the BGMV kernel is not available here; use lora.lora_delta, which falls back to XLA")
    B, O = x_BxD.shape[0], b_SxRxO.shape[2]
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((B, O), jnp.float32))
    return call(x_BxD, a_SxDxR, b_SxRxO, scale_S.astype(jnp.float32), slots_B.astype(jnp.int32))
