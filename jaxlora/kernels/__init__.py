"""The decode step's two CPU kernels, in C++ (the `*.cc` beside this file), called through XLA's FFI.

    bgmv(x, a, b, scale, slots)                  each row's own adapter's LoRA product (Punica's BGMV)
    decode_attention(q, k, v, positions, window) one new token per row against its own KV cache

Why: a decode step has one token per row, and XLA:CPU has no good form for either product.
- LoRA, `[1, D] @ [D, R]` then `[1, R] @ [R, O]` per row with the row's adapter: as batched dots
  over per-row copies of the weights (`lora.gather_rows`) XLA runs them single-threaded and reads
  every adapter once per row; as one matmul over all slots they are not bit-stable (a row's bits
  would depend on which slot its adapter sits in). The kernel reads each row's slot in place.
- Attention, `[G, H] @ [H, S]` per (row, kv head): XLA runs 64 tiny batched dots a layer at a
  fraction of the memory bandwidth, over the whole cache including the entries no query can see.
  The kernel reads only each row's visible entries.
Both split their rows over XLA's intra-op thread pool and compute every row in a fixed order from
its own data only, so a row's bits do not depend on its neighbours or on the thread that ran it.
Measured on the benchmark model (docs/benchmarks.md): together they took the decode step from
~22 ms to ~17 ms.

How: built on first use with the system C++ compiler (`c++`, or `$CXX`) against the FFI headers
that jaxlib ships (`jax.ffi.include_dir()`), into a per-user cache folder keyed by the sources,
the jaxlib version, the compiler, the flags and the machine (never on the adapter filesystem),
then registered as FFI targets. The hot loops are built for AVX-512, AVX2 and plain x86-64 and
picked at load time; with `-ffp-contract=off` all three give the same bits, and no libm call
depends on the host (attention's softmax has its own `exp`). Without a compiler,
on another backend, or for bfloat16, `model.py`'s XLA forms run instead: same semantics, and the
tests compare the two. The engine decides once which it uses (`applies`) and carries the choice in
its decode steps' config (`ModelConfig.decode_kernels`).

What it deliberately does not do: prefill (many tokens per row, where XLA's matmuls are good),
gradients (training never calls it), dtypes other than float32.
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
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxlora.fetch import cache_dir

log = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent
_TARGETS = {"jaxlora_bgmv": "JaxloraBgmv", "jaxlora_decode_attention": "JaxloraDecodeAttention",
            "jaxlora_host_mask": "JaxloraHostMask"}
# Portable: no -march (the file may be shared across hosts; the hot loops pick their ISA at load).
_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC")
_build_lock = threading.Lock()
_registered = False


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _sources() -> list[Path]:
    return sorted(p for p in _SOURCES.iterdir() if p.suffix in (".cc", ".h"))


def _compiler_id(cxx: str) -> str:
    """What the compiler says it is: an upgraded or switched compiler gets a new build."""
    return subprocess.run([cxx, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout


def _build(cxx: str) -> Path:
    """The compiled kernels, compiling them unless these sources, jaxlib, compiler, flags and machine
    already were. Builders write a temporary file of their own and rename it into place; a new
    build removes the older ones (a process still using one keeps its mapping)."""
    sources = _sources()
    key = [[(p.name, p.read_bytes()) for p in sources], jaxlib.__version__, cxx, _compiler_id(cxx), " ".join(_FLAGS),
           platform.machine()]
    tag = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"kernels-{tag}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", dir=lib.parent)
        os.close(fd)
        try:
            cc = [str(p) for p in sources if p.suffix == ".cc"]
            subprocess.run([cxx, *_FLAGS, "-I", jax.ffi.include_dir(), *cc, "-o", tmp],
                           check=True, capture_output=True, text=True, timeout=300)
            os.replace(tmp, lib)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(keep=lib)
    return lib


def _prune(keep: Path) -> None:
    """Removes earlier builds (and temporary files of builds killed an hour or more ago)."""
    for old in keep.parent.iterdir():
        try:
            stale_tmp = old.name.startswith(".") and time.time() - old.stat().st_mtime > 3600
            if old != keep and (old.name.endswith(".so") or stale_tmp):
                old.unlink()
        except FileNotFoundError:  # another process pruned it first
            pass


def _load(cxx: str) -> ctypes.CDLL:
    """The kernels' library; a cached file that does not load (corrupt, foreign) is rebuilt once.
    (A library that loads but lacks a symbol is not retried: the loader would hand back the same
    mapping. `_available` then reports it and decoding uses XLA's forms.)"""
    lib = _build(cxx)
    try:
        return ctypes.cdll.LoadLibrary(str(lib))
    except OSError:
        lib.unlink(missing_ok=True)
        return ctypes.cdll.LoadLibrary(str(_build(cxx)))


@functools.cache
def _available() -> bool:
    if jax.default_backend() != "cpu":
        return False
    cxx = os.environ.get("CXX", "c++")
    try:
        dll = _load(cxx)
        handlers = {target: getattr(dll, symbol) for target, symbol in _TARGETS.items()}
    except (OSError, AttributeError, subprocess.SubprocessError) as e:  # no compiler, a failed or hung build
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU decode kernels not available (%s); decoding uses XLA's forms instead", detail)
        return False
    global _registered
    if not _registered:  # XLA keeps the first registration for the process (a reload maps the same code)
        for target, handler in handlers.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
        dll.jaxlora_set_mask_fn(_MASK_TRAMPOLINE)
        _registered = True
    log.info("CPU decode kernels loaded: LoRA and attention in decode steps use them")
    return True


def available() -> bool:
    """True when the kernels are built and registered for the CPU backend in use (built once per
    process; replicas log which way they decode)."""
    with _build_lock:
        return _available()


def applies(dtype) -> bool:
    """Whether decoding with weights and cache of `dtype` uses the kernels."""
    return jnp.dtype(dtype) == jnp.float32 and available()


# -- host masks: the grammar rows' masks, fetched from the host inside a decode call -----------------

_MASK_FN_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_int32), ctypes.c_int64)
_mask_sources: dict[int, object] = {}  # id -> fn(fed [rows] int32) -> masks [rows, words] int32
_mask_lock = threading.Lock()


def _mask_trampoline(source, fed_ptr, rows, out_ptr, words) -> int:
    try:
        fed = np.ctypeslib.as_array(fed_ptr, shape=(rows,))
        out = np.ctypeslib.as_array(out_ptr, shape=(rows, words))
        fn = _mask_sources[source]()  # a weak reference: a source dies with its engine
        if fn is None:
            raise RuntimeError(f"mask source {source} is gone (its engine was collected)")
        out[...] = fn(fed.copy())
        return 0
    except BaseException:  # noqa: BLE001 - nothing may unwind into XLA; the call fails the step instead
        log.exception("grammar mask function %s failed", source)
        return 1


_MASK_TRAMPOLINE = _MASK_FN_TYPE(_mask_trampoline)  # kept alive for the process: XLA holds its address


def register_mask_source(fn) -> int:
    """An id for `fn(fed tokens [rows]) -> masks [rows, words]`, to pass to `host_masks` (the
    engine's decode program takes the id as an operand, so it is the same program for every engine)."""
    ref = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda: fn)
    with _mask_lock:
        source = len(_mask_sources)
        _mask_sources[source] = ref
        return source


def host_masks(source: jax.Array, fed_B: jax.Array, words: int) -> jax.Array:
    """masks [B, words] int32 = the function registered as `source`, called on the host with fed_B."""
    if not available():
        raise RuntimeError("the CPU kernels are not available here; the engine uses jax's io_callback instead")
    return jax.ffi.ffi_call("jaxlora_host_mask", jax.ShapeDtypeStruct((fed_B.shape[0], words), jnp.int32),
                            has_side_effect=True)(source.astype(jnp.int32), fed_B.astype(jnp.int32))


def _call(target: str, shape: tuple[int, ...], *args, **attrs) -> jax.Array:
    if not available():
        raise RuntimeError("the CPU decode kernels are not available here; the engine falls back to XLA's forms")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(*args, **attrs)


def bgmv(x_BxD: jax.Array, a_SxDxR: jax.Array, b_SxRxO: jax.Array, scale_S: jax.Array, slots_B: jax.Array) -> jax.Array:
    """y[i] = scale[s] * ((x[i] @ a[s]) @ b[s]) with s = slots[i]; float32 [B, O]."""
    return _call("jaxlora_bgmv", (x_BxD.shape[0], b_SxRxO.shape[2]), x_BxD, a_SxDxR, b_SxRxO,
                 scale_S.astype(jnp.float32), slots_B.astype(jnp.int32))


def decode_attention(q_BxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, positions_B: jax.Array,
                     sliding_window: int | None) -> jax.Array:
    """Attention of each row's one query (at positions[b]) over its cache entries s <= position
    (and s > position - sliding_window when set); float32 [B, N, H]."""
    return _call("jaxlora_decode_attention", q_BxNxH.shape, q_BxNxH, k_BxKxSxH, v_BxKxSxH,
                 positions_B.astype(jnp.int32), window=np.int64(sliding_window or 0))
