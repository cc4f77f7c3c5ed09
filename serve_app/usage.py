"""Usage per tenant: requests and tokens since the ledger started, per model (base or adapter).

`UsageLedger` is plain Python; the `TenantState` deployment (`deployments.py`) holds the one
instance of an app, so every ingress replica records into, and answers `GET /v1/usage` from, the
same totals. The ingress counts a request once its usage is final (what the response reported,
or what a client that left had been sent), exactly the figures its Prometheus counters get, in a
ledger of its own that it sends on as rows (`rows`, `add`) at most `SEND_INTERVAL_S` later: one Ray
call for many requests.

What it deliberately does not do: persist (totals restart with the app; Prometheus keeps history),
or answer for one tenant about another (`totals` takes the caller's own id only).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

SEND_INTERVAL_S = 0.5  # how long an ingress replica keeps what it counted before sending it to TenantState

Row = tuple[str, str, int, int, int]  # (tenant, model, requests, prompt tokens, completion tokens)


class UsageLedger:
    def __init__(self):
        self.started_at = int(time.time())
        # tenant -> model -> [requests, prompt tokens, completion tokens]
        self._totals: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0, 0]))

    def record(self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        row = self._totals[tenant][model]
        row[0] += requests
        row[1] += prompt_tokens
        row[2] += completion_tokens

    def rows(self) -> list[Row]:
        """Everything recorded, one row per tenant and model (what `add` takes)."""
        return [(tenant, model, *counts) for tenant, by_model in self._totals.items() for model, counts in by_model.items()]

    def add(self, rows: Iterable[Row]) -> None:
        for tenant, model, requests, prompt_tokens, completion_tokens in rows:
            self.record(tenant, model, prompt_tokens, completion_tokens, requests)

    def totals(self, tenant: str) -> dict:
        """The tenant's own usage, in the shape `GET /v1/usage` answers with."""
        by_model = [{"model": model, "requests": r, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                    for model, (r, p, c) in sorted(self._totals.get(tenant, {}).items())]
        prompt = sum(m["prompt_tokens"] for m in by_model)
        completion = sum(m["completion_tokens"] for m in by_model)
        return {"object": "usage", "tenant": tenant, "since": self.started_at,
                "requests": sum(m["requests"] for m in by_model), "prompt_tokens": prompt,
                "completion_tokens": completion, "total_tokens": prompt + completion, "by_model": by_model}
