"""Who gets the next free row: token-fair admission across tenants, or arrival order.

`fair` is the Virtual Token Counter of "Fairness in Serving Large Language Models" (Sheng et al.,
OSDI 2024). Each tenant has a counter of the service it received, in tokens: a prompt token counts
1, a completion token `completion_weight` (VTC's w_q / w_p; decoding a token costs more than
prefilling one), each divided by the request's tenant weight. A free row goes to the waiting tenant
with the lowest counter (ties: the earlier request), and within a tenant requests keep their order.

- Work-conserving: a lone tenant is never held back; counters only order the tenants that wait.
- No banked credit: a tenant that starts waiting again is lifted to the lowest counter of those
  already waiting (or, with none waiting, to the highest such minimum seen so far), so being idle
  earns nothing it can later spend to shut the others out.
- The bound this gives (tested on the mock engine): while two tenants both have requests waiting,
  their counters differ by at most the cost of one request plus what the rows already running earn
  (`max_batch_size` requests' completions), whatever the request sizes.

Preemption (`fair` only; the scheduler's `_preempt`): admission alone makes a tenant that arrives
while another holds every row wait for a row to finish, up to a whole request's length. So when
every row is taken and the least-served waiting tenant is behind the most-served running one by
more than its next request costs, one row of the latter (its latest request) is copied to host
memory and freed. The request resumes when the counters pick it again, in any row, from the very
state it left (KV cache, position, PRNG counter, penalty history): its bits do not change. A
request is swapped out at most `max_preemptions` times and never before it decoded in its row,
and at most `max_batch_size` requests are out at once (host memory: one more KV cache).

`fifo` is arrival order. Neither policy changes a request's bits: they only decide *when* it runs.
This module only keeps the counters and picks; the scheduler (`scheduler.py`) calls it.
"""

from __future__ import annotations

from collections.abc import Iterable

POLICIES = ("fair", "fifo")


class TokenCounters:
    """The virtual token counters of the `fair` policy (`fifo` keeps them too, but never reads them)."""

    def __init__(self, completion_weight: float = 2.0):
        self.completion_weight = completion_weight
        self.counters: dict[str, float] = {}
        self._floor = 0.0  # the highest minimum over waiting tenants seen: where a newcomer starts

    def activate(self, tenant: str, waiting: Iterable[str]) -> None:
        """`tenant` starts waiting; `waiting` are the tenants already waiting."""
        others = [self.counters.get(t, 0.0) for t in waiting if t != tenant]
        if others:
            self._floor = max(self._floor, min(others))
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(others) if others else self._floor)

    def charge_prompt(self, tenant: str, tokens: int, weight: float = 1.0) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / weight

    def charge_completion(self, tenant: str, tokens: int, weight: float = 1.0) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + self.completion_weight * tokens / weight

    def least_served(self, tenants: Iterable[str]) -> str:
        """The tenant of `tenants` (in their order of precedence on a tie) with the lowest counter."""
        return min(tenants, key=lambda t: self.counters.get(t, 0.0))
