"""XLA's compiled programs kept on disk, so a process that compiles what another already compiled on
this host loads it instead: a replica that restarts (a crash, a redeploy, a scale-up) is serving in
seconds rather than after its whole warm-up compilation (the tiny test model: 16 s of build and
warm-up to 6 s; the real model, SmolLM2-135M: 18.8 s to 10.8 s).

JAX's own persistent cache does the work; this module only chooses where it lives and turns it on.
Its key covers the program, jaxlib and the XLA flags, not the host's instruction set, and a cache
directory may be shared by several machines (a home folder on a network filesystem): each kind of
CPU gets a folder of its own (`host_tag`), so no host ever loads code compiled for another.

The cache is trusted code: it lives in the user's own cache folder (`jaxlora.fetch.cache_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path

import jax
import jaxlib

from jaxlora.fetch import cache_dir

log = logging.getLogger(__name__)


def host_tag() -> str:
    """What compiled code depends on besides the program: jaxlib, the machine and its CPU features."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first CPU's model and feature flags are every CPU's
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    cpu += line
                elif not line.strip() and cpu:
                    break
    except OSError:  # not Linux: the processor string stands for the CPU
        cpu = platform.processor()
    key = repr((jaxlib.__version__, platform.machine(), cpu))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def use_compilation_cache(root: Path | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in `root`/xla/<host_tag> (`root`: `cache_dir()`)
    and returns that folder. Must run before this process compiles anything: JAX reads the setting
    once, at its first compilation. A folder already set (`JAX_COMPILATION_CACHE_DIR` or another
    caller) is kept, and returned."""
    if not (path := jax.config.jax_compilation_cache_dir):
        path = (root or cache_dir()) / "xla" / host_tag()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home: serve anyway, compiling as before
            log.warning("no XLA compilation cache (%s): every start compiles its programs", e)
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, however quickly it compiled: a replica's warm-up is many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(path)
