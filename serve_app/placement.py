"""Which model replica a request goes to: every adapter has a home replica, which it leaves only when
the home carries more than its share of the load. Pure functions of replica ids and loads, no Ray:
`serve_app.routing` is the Serve request router that feeds them and applies their answer.

Homes: rendezvous (highest-random-weight) hashing. Each replica gets a score hash(key, replica id) per
adapter key; the replicas in descending score are the adapter's order, the first its home. Every
router that sees the same replicas computes the same order, with no state shared between them. A
replica removed takes out only its own place in every order (the others' scores do not change), so
only the adapters homed on it move, each to the next replica of its own order; a replica added moves
only the adapters it now outscores. Nothing is remembered between requests, so nothing has to be
rebuilt or agreed on when the replicas change.

The key is the tenant and the adapter as the request names it: `alice/faq`, or `alice/faq@v0003` when a
version is pinned (the ingress has already checked the name). An unpinned name is resolved to a version
inside the model replica, so a new `latest` keeps its adapter's home: the replica that has been serving
it, whose poller reads the new version in the background before new requests get it
(`jaxlora/adapter_versions.py`). A pinned version is an adapter of its own. A shared adapter
(`adapters/<id>`, readable by every tenant) has one home per tenant that uses it.

The bound (consistent hashing with bounded loads: Mirrokni, Thorup and Zadimoghaddam, SODA 2018;
HAProxy's `hash-balance-factor`): with T requests in flight on n replicas, a replica takes one more only
while its load is below the capacity ceil(c * (T + 1) / n), c = `LOAD_FACTOR` = 1.25; a request goes to
the first replica of its adapter's order that is below it. Hence:
  - no replica carries more than c times the average (rounded up, counting the request placed): a hot
    adapter cannot overload its home; its overflow goes to the second replica of its order, then the
    third, the same replicas in the same order for every burst, so they keep the adapter loaded too;
  - some replica is always below the capacity (the least loaded carries at most floor(T / n), less than
    ceil((T + 1) / n)), so a request is always placed, after at most n looks;
  - while the home is below it the request goes home, whatever the other replicas carry; a request
    that arrives with none in flight (T = 0: the capacity is 1 for any n >= 2, and T + 1 with one
    replica) always goes home, so requests one at a time never leave it.
Why a multiple of the average and not a fixed number such as the replica's decode rows: it holds at
every level of load. Under saturation, where every replica is past its rows, a fixed bound would no
longer tell replicas apart, and would let a hot adapter queue at its home while others have room; at
low load it would keep a batch of one adapter's requests on its home while another replica idles.
Why 1.25: a replica carries at most a quarter more than its share, while the requests that must leave
home to keep a tighter bound grow as it tightens (as 1/eps^2 for c = 1 + eps in Mirrokni et al.'s
analysis).

Base-model requests have no adapter to keep loaded: they go to the least loaded replica, ties to the
lowest replica id. Deterministic on purpose: a tie is mostly the idle case, and then one replica gets
the base model's requests one after the other, and its prefix cache their shared prompt prefixes.

Not here: where the loads come from, which replicas can take a request at all (Serve's
max_ongoing_requests), and everything about Ray (`serve_app.routing`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

LOAD_FACTOR = Fraction(5, 4)  # c: a replica carries at most this many times the average load (rounded up)


def adapter_key(tenant: str, adapter: str | None) -> str | None:
    """The key an adapter's requests are homed by: `tenant/id`, or `tenant/id@v0003` pinned. None for
    the base model."""
    return None if adapter is None else f"{tenant}/{adapter}"


def _score(key: str, replica: str) -> int:
    # A keyed hash, the same in every process (Python's hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(f"{key}\n{replica}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """`replicas` by descending score for `key`: the home first, then where its overflow goes."""
    return sorted(replicas, key=lambda r: (_score(key, r), r), reverse=True)


def capacity(loads: Mapping[str, int], factor: Fraction = LOAD_FACTOR) -> int:
    """The load a replica must be below to take one more request: ceil(c * (T + 1) / n)."""
    return math.ceil(factor * (sum(loads.values()) + 1) / len(loads))


def place(key: str | None, loads: Mapping[str, int], factor: Fraction = LOAD_FACTOR) -> str:
    """The replica for one request. `loads`: replica id -> requests in flight on it, for the replicas
    that can take a request; `key`: `adapter_key`, None for the base model."""
    if not loads:
        raise ValueError("no replica to place the request on")
    if key is None:
        return min(loads, key=lambda r: (loads[r], r))
    bound = capacity(loads, factor)
    return next(r for r in rendezvous_order(key, loads) if loads[r] < bound)
