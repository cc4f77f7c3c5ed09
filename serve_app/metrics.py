"""What the serving app exports to Prometheus (through Ray's metrics), one table per deployment.

Ray prefixes every name with `ray_`; a Counter is exposed as `ray_<name>_total`, a Histogram as
`ray_<name>_bucket` / `_sum` / `_count`, a Gauge as `ray_<name>`. Serve adds the tags `application`,
`deployment` and `replica` to each series (README, "Metrics", lists the names as Prometheus sees them;
docs/grafana/jaxlora.json queries them).

The LoRAModel rows read their value from `backend.metrics()` (`source`, a dotted path into it). The
engine keeps cumulative totals; `CounterExport` turns them into increments, so a Prometheus counter
starts at 0 with each replica, the way Prometheus expects a restarted process to behave. The Ingress
rows are observed per request, where the tenant, the served model and the final usage are known.

Tag cardinality: `tenant` takes one value per API key's user, `model` one per base model or adapter id
and `adapter_version` one per published version, so the series are bounded by the keys file and the
adapter store (tenants x adapters x versions), never by what a client sends: requests refused before a
replica accepted them are counted with `tenant=""` and `model=""`.

This module does not decide what to measure inside the engine (jaxlora.metrics does) nor when to
export (the deployments do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    """As given to Ray; Prometheus sees `ray_<name>` plus the kind's suffix."""
    kind: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    """Histogram bucket upper bounds, in the unit the name ends with."""
    source: str | Mapping[str, str] = ""
    """LoRAModel only: the dotted path of the value in `backend.metrics()`, or, for a metric with one
    tag, a map from that tag's value to a path."""

    def prometheus_names(self) -> tuple[str, ...]:
        base = f"ray_{self.name}"
        return {COUNTER: (f"{base}_total",), GAUGE: (base,),
                HISTOGRAM: (f"{base}_bucket", f"{base}_sum", f"{base}_count")}[self.kind]

    def build(self):
        if self.kind == HISTOGRAM:
            return Histogram(self.name, self.description, list(self.boundaries), self.tag_keys)
        return {COUNTER: Counter, GAUGE: Gauge}[self.kind](self.name, self.description, self.tag_keys)


MODEL_METRICS = (
    Metric("jaxlora_queue_depth", GAUGE, "requests waiting for a decode row", source="queue_depth"),
    Metric("jaxlora_active_rows", GAUGE, "decode rows in use", source="active_rows"),
    Metric("jaxlora_swapped_out", GAUGE, "preempted requests whose row waits in host memory", source="swapped_out"),
    Metric("jaxlora_preemptions", COUNTER, "rows swapped out so a tenant far behind could start (fair scheduling)",
           source="preemptions"),
    Metric("jaxlora_batch_occupancy", GAUGE, "share of decode row-steps doing useful work since the replica started",
           source="batch_occupancy"),
    Metric("jaxlora_decode_tokens_per_s", GAUGE, "generated tokens per second of decode time since the replica started",
           source="decode_tokens_per_s"),
    Metric("jaxlora_decode_kernels", GAUGE, "1 when decode steps use the CPU kernels, 0 for XLA's forms (replicas should agree)",
           source="decode_kernels"),
    Metric("jaxlora_host_rss_bytes", GAUGE, "resident memory of the replica process", source="memory.host_rss_bytes"),
    Metric("jaxlora_compilations", COUNTER, "XLA compilations in this replica", source="compilations"),
    Metric("jaxlora_adapter_loads", COUNTER, "adapters read from the store", source="adapter_cache.loads"),
    Metric("jaxlora_adapter_evictions", COUNTER, "adapters evicted from device slots", source="adapter_cache.evictions"),
    Metric("jaxlora_adapter_reload_failures", COUNTER, "new adapter versions that failed to load",
           source="adapter_reload.reload_failures"),
    Metric("jaxlora_prefilling_rows", GAUGE, "decode rows whose prompt is still being prefilled, a chunk at a time",
           source="prefilling_rows"),
    Metric("jaxlora_prefill_calls", COUNTER, "prefill chunk calls", source="prefill_calls"),
    Metric("jaxlora_prompt_wait_row_steps", COUNTER, "decode row-steps of rows idle while their request's prompt was "
           "still being prefilled", source="prompt_wait_row_steps"),
    Metric("jaxlora_kv_cache_bytes", GAUGE, "memory of the decode rows' KV cache", source="kv_cache_bytes"),
    Metric("jaxlora_prefix_cache_bytes", GAUGE, "memory the prefix cache holds (at most engine.prefix_cache_bytes)",
           source="prefix_cache.bytes"),
    Metric("jaxlora_prefix_cache_hits", COUNTER, "requests that found at least one prompt chunk in the prefix cache",
           source="prefix_cache.hits"),
    Metric("jaxlora_prefix_cache_lookups", COUNTER, "requests with a complete chunk before their last, which looked one up",
           source="prefix_cache.lookups"),
    Metric("jaxlora_prefix_cache_hit_tokens", COUNTER, "prompt tokens served from the prefix cache",
           source="prefix_cache.hit_tokens"),
    Metric("jaxlora_prefix_cache_evictions", COUNTER, "prefix cache chunks evicted to stay within its bytes",
           source="prefix_cache.evictions"),
    Metric("jaxlora_grammar_compiles", COUNTER, "grammars (response_format, tools) compiled for the vocabulary",
           source="grammar.compiles"),
    Metric("jaxlora_grammar_compile_seconds", COUNTER, "time spent compiling them", source="grammar.compile_seconds"),
    Metric("jaxlora_grammar_cache_hits", COUNTER, "requests whose grammar was compiled already", source="grammar.cache_hits"),
    Metric("jaxlora_grammar_refused", COUNTER, "grammars refused at compile (invalid, or past the compile deadline)",
           source="grammar.refused"),
    Metric("jaxlora_grammar_masks", COUNTER, "token masks computed for constrained rows (one per row and token)",
           source="grammar.masks"),
    Metric("jaxlora_grammar_mask_seconds", COUNTER, "host time computing them (per token: divide by the masks' rate)",
           source="grammar.mask_seconds"),
    Metric("jaxlora_engine_generated_tokens", COUNTER, "tokens the engine decoded (including any past a stop string)",
           source="generated_tokens"),
    Metric("jaxlora_engine_requests", COUNTER, "requests the engine ended, by outcome", ("outcome",),
           source={"finished": "requests_finished", "cancelled": "requests_cancelled", "failed": "requests_failed",
                   "rejected": "requests_rejected_overload"}),
)

TTFT_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0)
TPOT_BOUNDARIES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
E2E_BOUNDARIES = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
USAGE_TAGS = ("tenant", "model", "adapter_version")

INGRESS_METRICS = (
    Metric("jaxlora_requests", COUNTER, "HTTP requests answered, by tenant, served model, route and status "
           "(499: the client went away mid-response)", ("tenant", "model", "route", "status")),
    Metric("jaxlora_prompt_tokens", COUNTER, "prompt tokens of requests a replica accepted (the basis of billing)", USAGE_TAGS),
    Metric("jaxlora_completion_tokens", COUNTER, "completion tokens sent, as reported in usage; a stream the client "
           "left counts what it was sent (the basis of billing)", USAGE_TAGS),
    Metric("jaxlora_rate_limit_unchecked", COUNTER, "requests served without their tenant's rate limits checked: "
           "TenantState did not answer within rate_limit_timeout_s (the ingress fails open)", ("tenant",)),
    # Latencies of complete answers (status 200), timed from the ingress handler receiving the validated
    # body, so tokenization and queueing for a decode row are included.
    Metric("jaxlora_time_to_first_token_seconds", HISTOGRAM, "time to the first output of a complete answer",
           ("route", "model"), TTFT_BOUNDARIES),
    Metric("jaxlora_time_per_output_token_seconds", HISTOGRAM, "(e2e - ttft) / (completion_tokens - 1), for complete "
           "answers with two or more completion tokens", ("route", "model"), TPOT_BOUNDARIES),
    Metric("jaxlora_e2e_request_latency_seconds", HISTOGRAM, "time to the last output of a complete answer",
           ("route", "model"), E2E_BOUNDARIES),
)


def build(table: tuple[Metric, ...]) -> dict:
    """name -> the Ray metric object, for one deployment's table."""
    return {m.name: m.build() for m in table}


def _at(snapshot: Mapping, path: str):
    value = snapshot
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None  # not reported here (host RSS off Linux)
        value = value[key]
    return value


class CounterExport:
    """Exports one snapshot of `backend.metrics()` through a deployment's metrics: gauges are set,
    counters are incremented by how much their cumulative total grew since the last export (never
    negative; a total that went down is taken as the new starting point)."""

    def __init__(self, table: tuple[Metric, ...], metrics: Mapping):
        self.table, self.metrics = table, metrics
        self._last: dict[tuple[str, str], float] = {}  # (metric name, tag value) -> total already exported

    def export(self, snapshot: Mapping) -> None:
        for m in self.table:
            sources = m.source if isinstance(m.source, Mapping) else {"": m.source}
            for tag_value, path in sources.items():
                value = _at(snapshot, path)
                if value is None:
                    continue
                tags = {m.tag_keys[0]: tag_value} if tag_value else None
                if m.kind == GAUGE:
                    self.metrics[m.name].set(float(value), tags=tags)
                    continue
                last = self._last.get((m.name, tag_value), 0)
                if value > last:
                    self.metrics[m.name].inc(float(value - last), tags=tags)
                self._last[m.name, tag_value] = value
