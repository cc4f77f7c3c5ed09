"""`jaxlora.cpu_threads`: the XLA CPU backend's compute pool sized to the CPUs an engine reserves. Each
case runs in a fresh interpreter (the pool is sized once per process, when the backend starts) and
reports the pool's threads and every thread's CPU affinity after a jitted matmul has run on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")

PROBE = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp
    from jaxlora.cpu_threads import compute_threads, limit_compute_threads

    cpus = sorted(os.sched_getaffinity(0))
    limit = json.loads(sys.argv[1])
    first = None
    if limit is not None:
        first = limit_compute_threads(limit)
    x = jnp.ones((512, 512))
    jax.jit(lambda a: a @ a)(x).block_until_ready()
    again = limit_compute_threads(1) if limit is not None else None  # too late: the pool is already sized
    pinned = [t for t in os.listdir("/proc/self/task") if sorted(os.sched_getaffinity(int(t))) != cpus]
    print(json.dumps({"cpus": len(cpus), "first": first, "after": compute_threads(), "again": again, "pinned": pinned}))
""")


def probe(limit: int | None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(limit)], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_by_default_xla_computes_on_a_thread_per_schedulable_cpu():
    """The premise: without a limit the pool has one thread per CPU this process may run on."""
    got = probe(None)
    assert got["after"] == got["cpus"], got


def test_a_limited_backend_computes_on_one_thread_and_leaves_no_thread_pinned():
    got = probe(1)
    assert got["first"] == got["after"] == 1, got
    assert got["again"] == 1, got  # once started, a second call changes nothing and says so
    assert got["pinned"] == [], got  # every thread, the pool's too, may run on every CPU again


def test_a_limit_of_zero_threads_is_refused():
    from jaxlora.cpu_threads import limit_compute_threads

    with pytest.raises(ValueError, match="must be >= 1"):
        limit_compute_threads(0)
