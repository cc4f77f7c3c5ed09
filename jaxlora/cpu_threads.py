"""How many threads the XLA CPU backend computes on: the CPUs reserved for the engine, not every core.

XLA sizes its CPU compute pool (threads named `tf_XLAEigen`) once, when the backend starts, from the
CPU affinity of the thread that starts it: one thread per schedulable CPU. A model replica that
reserves one of Ray's CPUs but computes on every core takes the others from the processes beside it
(Serve's proxy, the ingress, the tokenizer), which every request passes through: under load each of
them waits for a core, and each decode call's parallel part waits for its slowest thread. vLLM's CPU
backend keeps cores for its frontend for the same reason (figures: docs/benchmarks.md).

`limit_compute_threads(n)` narrows the calling thread's affinity to n CPUs while the backend starts,
then gives every thread of the process its affinity back: only the pool's size is set, no thread
stays pinned to a core (several replicas on one node do not pile onto the same one).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

POOL_THREAD_NAME = "tf_XLAEigen"


def compute_threads() -> int | None:
    """The XLA CPU backend's compute threads in this process now (None where /proc is not there)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == POOL_THREAD_NAME
        except OSError:  # the thread ended meanwhile
            pass
    return count


def limit_compute_threads(n: int) -> int | None:
    """Starts JAX's CPU backend with `n` compute threads (fewer if fewer CPUs are schedulable) and
    returns how many it has. Must run before anything else in the process starts the backend: once
    started its pool is fixed, which is logged and left as it is."""
    if n < 1:
        raise ValueError(f"the compute threads must be >= 1, got {n}")
    if started := compute_threads():
        log.warning("JAX's CPU backend started before its compute threads could be limited to %d: it keeps %d",
                    n, started)
        return started
    if not hasattr(os, "sched_setaffinity"):
        log.warning("this platform sets no CPU affinity: the XLA CPU backend keeps its default threads")
        jax.devices("cpu")
        return compute_threads()
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(sorted(cpus)[:n]))
    try:
        jax.devices("cpu")
    finally:
        for tid in os.listdir("/proc/self/task"):  # the threads the backend started inherited the narrow set
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # the thread ended meanwhile
                pass
    return compute_threads()
