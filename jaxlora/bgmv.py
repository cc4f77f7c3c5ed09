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
that jaxlib ships (`jax.ffi.include_dir()`), into a per-user cache folder keyed by the source,
the jaxlib version, the compiler, the flags and the machine (never on the adapter filesystem),
then registered as an FFI target. Without a
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
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "kernels" / "bgmv.cc"
_TARGET = "jaxlora_bgmv"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")  # portable: no -march, the file may be shared across hosts
_build_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlora" / "kernels"


def _build(cxx: str) -> Path:
    """The compiled kernel, compiling it unless this source, jaxlib, compiler, flags and machine
    already were. Builders write a temporary file of their own and rename it into place."""
    key = [_SOURCE.read_bytes(), jaxlib.__version__, cxx, " ".join(_FLAGS), platform.machine()]
    tag = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"bgmv-{tag}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cxx, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp],
                           check=True, capture_output=True, text=True, timeout=300)
            os.replace(tmp, lib)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return lib


def _load(cxx: str):
    """The kernel's FFI handler; a cached file that does not load (corrupt, foreign) is rebuilt once."""
    lib = _build(cxx)
    try:
        return ctypes.cdll.LoadLibrary(str(lib)).JaxloraBgmv
    except (OSError, AttributeError):
        lib.unlink(missing_ok=True)
        return ctypes.cdll.LoadLibrary(str(_build(cxx))).JaxloraBgmv


@functools.cache
def _available() -> bool:
    if jax.default_backend() != "cpu":
        return False
    cxx = os.environ.get("CXX", "c++")
    try:
        handler = _load(cxx)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:  # no compiler, a failed or hung build
        detail = getattr(e, "stderr", "") or e
        log.warning("BGMV kernel not available (%s); decoding uses XLA's batched dots instead", detail)
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    log.info("BGMV kernel loaded: LoRA decoding on CPU uses it")
    return True


def available() -> bool:
    """True when the kernel is built and registered for the CPU backend in use (built once per
    process; replicas log which way they decode)."""
    with _build_lock:
        return _available()


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
