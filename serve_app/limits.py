"""Per-tenant requests-per-minute and tokens-per-minute limits: a token bucket per tenant and kind, the
model OpenAI documents for its own limits.

A bucket holds up to the per-minute limit and refills continuously at limit/60 per second. A request
takes 1 from the tenant's "requests" bucket (a batch of prompts, one per prompt) and its reservation
from its "tokens" bucket: prompt tokens + max_tokens for each choice (the ingress reserves the rest of
the context when a request gives no max_tokens, as the engine then fills it). It is admitted only if every limited bucket has enough; a refused request takes
nothing. When it ends, `settle` gives back what was reserved but not used (its usage: prompt +
completion tokens), so the tokens bucket ends up charged with what was used, and never more is in
flight than the limit allows. A reservation larger than the whole limit (or a batch of more prompts
than the requests limit) can never be admitted: it is refused with a message naming what to lower and
no Retry-After (OpenAI's "Request too large").

`Limiter` is plain Python with an injected clock (unit-tested with a fake one); the `TenantState`
deployment holds the one instance of an app, so every ingress replica draws on the same buckets.
`Decision` carries what a response needs: OpenAI's x-ratelimit-* headers, and for a refusal the 429.

What it deliberately does not do: decide a tenant's limits (the ingress does, from `AppArgs` and the
keys file's tiers), survive a restart (buckets start full with a new TenantState replica), settle
a request it never hears the end of (its reservation is simply spent; the bucket refills within a
minute), or decide what happens when TenantState does not answer (the ingress fails open, see
`serve_app/ingress.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from serve_app.errors import ApiError

REQUESTS, TOKENS = "requests", "tokens"  # the kinds, as OpenAI names them in its headers and error `type`


@dataclasses.dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None  # None: no limit of this kind
    tokens_per_minute: int | None = None

    def override(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> Limits:
        """These limits with each given (not None) value in place of its own: a tier over the defaults."""
        return Limits(self.requests_per_minute if requests_per_minute is None else requests_per_minute,
                      self.tokens_per_minute if tokens_per_minute is None else tokens_per_minute)

    def __bool__(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclasses.dataclass
class _Bucket:
    capacity: int  # the per-minute limit
    level: float  # what is left; below 0 only if a request used more than it reserved
    at: float  # the clock time `level` was computed for

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60)
        self.at = now

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) * 60 / self.capacity)


@dataclasses.dataclass(frozen=True)
class Budget:
    """One bucket as a response reports it (OpenAI's x-ratelimit-{limit,remaining,reset}-<kind>)."""
    limit: int
    remaining: int  # whole units left after this request's share was taken
    reset_s: float  # seconds until the bucket is full again


@dataclasses.dataclass(frozen=True)
class Decision:
    budgets: dict[str, Budget]  # kind -> its bucket after the decision; only the tenant's limited kinds
    requested: int  # tokens the request asked to reserve (prompt + max_tokens of each choice)
    prompt_tokens: int
    refused: str | None = None  # the kind the request does not fit; None: admitted
    retry_after_s: float | None = None  # refused: seconds until it would fit; None: never (over the whole limit)
    requests: int = 1  # requests it counts as (a batch of prompts: one per prompt)

    @property
    def admitted(self) -> bool:
        return self.refused is None

    @property
    def reserved(self) -> int:
        """Tokens taken from the tokens bucket, which `settle` is told about at the end."""
        return self.requested if self.admitted and TOKENS in self.budgets else 0

    def headers(self) -> dict[str, str]:
        out = {}
        for kind, b in self.budgets.items():
            out |= {f"x-ratelimit-limit-{kind}": str(b.limit), f"x-ratelimit-remaining-{kind}": str(b.remaining),
                    f"x-ratelimit-reset-{kind}": duration(b.reset_s)}
        return out

    def error(self) -> ApiError:
        """The 429 of a refusal, in OpenAI's shape: `type` is the kind, the message names the limit."""
        b = self.budgets[self.refused]
        max_tokens = self.requested - self.prompt_tokens
        if self.retry_after_s is None and self.refused == REQUESTS:
            message = (f"Request too large for requests per min (RPM): Limit {b.limit}, Requested {self.requests} "
                       "(one per prompt). It can never fit this limit: send fewer prompts at once")
            return ApiError(429, message, self.refused, None, "rate_limit_exceeded", headers=self.headers())
        if self.retry_after_s is None:
            message = (f"Request too large for tokens per min (TPM): Limit {b.limit}, Requested {self.requested} "
                       f"(prompt {self.prompt_tokens} + max_tokens {max_tokens}). It can never fit this limit: lower "
                       f"max_tokens or shorten the prompt (without max_tokens the rest of the context is reserved)")
            return ApiError(429, message, self.refused, None, "rate_limit_exceeded", headers=self.headers())
        wait = duration(self.retry_after_s)
        if self.refused == REQUESTS:
            message = f"Rate limit reached for requests per min (RPM): Limit {b.limit}. Please try again in {wait}."
        else:
            message = (f"Rate limit reached for tokens per min (TPM): Limit {b.limit}, Remaining {b.remaining}, "
                       f"Requested {self.requested} (prompt {self.prompt_tokens} + max_tokens {max_tokens}). "
                       f"Please try again in {wait}, or lower max_tokens.")
        headers = self.headers() | {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return ApiError(429, message, self.refused, None, "rate_limit_exceeded", headers=headers)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}  # (tenant, kind) -> its bucket

    def _bucket(self, tenant: str, kind: str, limit: int | None, now: float) -> _Bucket | None:
        """The tenant's bucket of `kind`, refilled to `now`; a new one starts full. A changed limit (the
        tenant was re-tiered) keeps what is left, at most the new limit; no limit drops the bucket."""
        if limit is None:
            self._buckets.pop((tenant, kind), None)
            return None
        bucket = self._buckets.setdefault((tenant, kind), _Bucket(limit, limit, now))
        bucket.refill(now)
        if bucket.capacity != limit:
            bucket.capacity, bucket.level = limit, min(bucket.level, limit)
        return bucket

    def admit(self, tenant: str, limits: Limits, prompt_tokens: int, max_tokens: int, requests: int = 1) -> Decision:
        """Takes `requests` requests and `prompt_tokens + max_tokens` tokens from the tenant's buckets if
        both fit; takes nothing otherwise."""
        now = self.clock()
        requested = prompt_tokens + max_tokens
        needs = {REQUESTS: requests, TOKENS: requested}
        buckets = {kind: b for kind, limit in ((REQUESTS, limits.requests_per_minute), (TOKENS, limits.tokens_per_minute))
                   if (b := self._bucket(tenant, kind, limit, now)) is not None}
        refused, retry_after = None, None
        never = [kind for kind, b in buckets.items() if needs[kind] > b.capacity]
        if never:
            refused = TOKENS if TOKENS in never else REQUESTS
        else:
            waits = {kind: b.seconds_until(needs[kind]) for kind, b in buckets.items()}
            if any(w > 0 for w in waits.values()):
                refused = max(waits, key=waits.get)  # the one that makes it wait longest
                retry_after = waits[refused]
        if refused is None:
            for kind, b in buckets.items():
                b.level -= needs[kind]
        budgets = {kind: Budget(b.capacity, max(0, math.floor(b.level)), b.seconds_until(b.capacity))
                   for kind, b in buckets.items()}
        return Decision(budgets, requested, prompt_tokens, refused, retry_after, requests)

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        """A request that reserved `reserved` tokens ended having used `used`: the difference goes back
        (or, had it used more, is taken too)."""
        bucket = self._buckets.get((tenant, TOKENS))
        if bucket is not None:
            bucket.refill(self.clock())
            bucket.level = min(bucket.capacity, bucket.level + reserved - used)


def duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go's format): "20ms", "1s", "17.5s", "6m0s"."""
    ms = math.ceil(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"
