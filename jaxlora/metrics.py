"""Engine metrics as plain numbers; the serving layer exports them (it owns no logic of its own).

Counters only grow; latency series keep the most recent values for percentiles. Read everything at
once with `snapshot()`, which also adds the adapter cache's counters, compilations and peak memory.
The totals stay cumulative here; serve_app.metrics turns them into Prometheus counters (by delta) and
gauges, and measures per-request latency and per-tenant usage at the ingress instead of from these windows.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import resource
import threading

import numpy as np

WINDOW = 2048  # latency samples kept per series


def _percentiles(values) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    a = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def peak_memory_bytes() -> dict[str, int]:
    """Resident memory of this process now and at its peak and, where the device reports it,
    device peak bytes."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["host_rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak only
        pass
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    except Exception:  # a backend without memory stats reports host memory only
        pass
    return out


@dataclasses.dataclass
class EngineMetrics:
    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected_overload: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_calls: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0  # chunk tokens of the rows prefill calls computed (the tail chunk padded)
    decode_seconds: float = 0.0
    busy_row_steps: int = 0
    total_row_steps: int = 0
    prompt_wait_row_steps: int = 0  # decode row-steps of rows held by a request whose prompt was still prefilling
    ttft_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    tpot_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    latency_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def record_decode(self, seconds: float, busy_rows: int, prefilling_rows: int, rows: int, steps: int,
                      tokens: int) -> None:
        with self.lock:
            self.decode_calls += 1
            self.decode_seconds += seconds
            self.busy_row_steps += busy_rows * steps
            self.prompt_wait_row_steps += prefilling_rows * steps
            self.total_row_steps += rows * steps
            self.generated_tokens += tokens

    def record_prefill(self, tokens: int) -> None:
        with self.lock:
            self.prefill_calls += 1
            self.prefill_tokens += tokens

    def record_finish(self, ttft: float | None, latency: float, completion_tokens: int, outcome: str) -> None:
        with self.lock:
            if outcome == "cancelled":
                self.requests_cancelled += 1
            elif outcome == "error":
                self.requests_failed += 1
            else:
                self.requests_finished += 1
            if ttft is not None:
                self.ttft_s.append(ttft)
                if completion_tokens > 1:
                    self.tpot_s.append((latency - ttft) / (completion_tokens - 1))
            self.latency_s.append(latency)

    def snapshot(self) -> dict:
        with self.lock:
            out = {k: getattr(self, k) for k in (
                "requests_submitted", "requests_finished", "requests_cancelled", "requests_failed",
                "requests_rejected_overload", "preemptions", "prompt_tokens", "generated_tokens", "decode_calls",
                "prefill_calls", "prefill_tokens", "prompt_wait_row_steps")}
            out["decode_tokens_per_s"] = self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0
            out["batch_occupancy"] = self.busy_row_steps / self.total_row_steps if self.total_row_steps else 0.0
            out["ttft_s"] = _percentiles(self.ttft_s)
            out["tpot_s"] = _percentiles(self.tpot_s)
            out["latency_s"] = _percentiles(self.latency_s)
        return out
