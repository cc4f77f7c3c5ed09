"""Adapter homes with bounded load (`serve_app.placement`) on fake replica ids and loads, with sequences
worked out by hand, and the Serve request router that applies them (`serve_app.routing`) on fake
replicas: requests placed in a burst count against each other, ends and abandoned requests free
their place, and a replica Serve knows to be full is left out."""

from __future__ import annotations

import asyncio
import collections
import random
import string

import pytest

from serve_app.placement import adapter_key, capacity, place, rendezvous_order

RNG = random.Random(7)
REPLICAS = ["".join(RNG.choice(string.ascii_lowercase + string.digits) for _ in range(8)) for _ in range(5)]  # as Serve's
KEYS = [adapter_key(f"tenant{i % 7}", f"adapter{i}") for i in range(2000)]


def home(key: str, replicas) -> str:
    return rendezvous_order(key, replicas)[0]


def test_the_key_is_tenant_and_adapter_as_named_pinned_version_included():
    assert adapter_key("alice", "faq") == "alice/faq"
    assert adapter_key("alice", "faq@v0003") == "alice/faq@v0003"
    assert adapter_key("alice", None) is None
    assert adapter_key("bob", "faq") != adapter_key("alice", "faq")


def test_the_order_is_the_same_whatever_order_the_replicas_are_listed_in():
    for key in KEYS[:50]:
        assert rendezvous_order(key, REPLICAS) == rendezvous_order(key, reversed(REPLICAS)) == \
            rendezvous_order(key, sorted(REPLICAS))


def test_requests_one_at_a_time_always_go_home_and_homes_spread_over_the_replicas():
    for n in range(1, len(REPLICAS) + 1):
        replicas = REPLICAS[:n]
        idle = dict.fromkeys(replicas, 0)
        assert all(place(key, idle) == home(key, replicas) for key in KEYS)
    homes = collections.Counter(home(key, REPLICAS) for key in KEYS)
    assert set(homes) == set(REPLICAS) and max(homes.values()) < 1.3 * min(homes.values()), homes


def test_below_the_bound_a_request_goes_home_whatever_the_others_carry():
    a, b, c = rendezvous_order("alice/faq", ["r0", "r1", "r2"])
    # T = 2 in flight, capacity ceil(1.25 * 3 / 3) = 2: the home (1) is below it, the idle replica does not matter.
    assert place("alice/faq", {a: 1, b: 0, c: 1}) == a
    # T = 3, capacity ceil(1.25 * 4 / 3) = 2: the home (2) is not below it, the next in its order is.
    assert place("alice/faq", {a: 2, b: 0, c: 1}) == b
    # T = 4, capacity ceil(1.25 * 5 / 3) = 3: the home again.
    assert place("alice/faq", {a: 2, b: 1, c: 1}) == a


def test_a_stream_of_adapters_each_below_the_bound_at_its_home_is_all_served_at_home():
    """Requests come and go over four replicas; every one that finds its home below the capacity is
    placed there, and the loads never pass the bound."""
    rng, loads, running = random.Random(1), dict.fromkeys(REPLICAS[:4], 0), []
    keys, at_home = KEYS[:40], 0
    for _ in range(5000):
        if running and (rng.random() < 0.5 or len(running) > 30):
            loads[running.pop(rng.randrange(len(running)))] -= 1
        key = rng.choice(keys)
        bound, h = capacity(loads), home(key, loads)
        chosen = place(key, loads)
        if loads[h] < bound:
            assert chosen == h
            at_home += 1
        loads[chosen] += 1
        running.append(chosen)
        assert max(loads.values()) <= bound
    assert at_home > 0.75 * 5000  # most arrivals find their home below the bound: the check above is not idle


def test_a_hot_adapter_overflows_to_the_next_replicas_of_its_order():
    """One adapter, requests that do not end: hand-computed from capacity = ceil(1.25 * (T + 1) / n)."""
    def burst(replicas, m):
        order, loads, went = rendezvous_order("alice/hot", replicas), dict.fromkeys(replicas, 0), []
        for _ in range(m):
            chosen = place("alice/hot", loads)
            loads[chosen] += 1
            went.append(order.index(chosen))
        return went

    # n = 2: capacities 1, 2, 2, 3, 4, 4, 5, 5, 6, 7 for T = 0..9
    assert burst(["r0", "r1"], 10) == [0, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    # n = 3: capacities 1, 1, 2, 2, 3, 3, 3, 4, 4, 5: the third replica takes its first at T = 6
    assert burst(["r0", "r1", "r2"], 10) == [0, 1, 0, 1, 0, 1, 2, 0, 1, 0]
    # n = 5, 60 requests: the home carries the most, never more than ceil(1.25 * 60 / 5) = 15, and the
    # replicas in use are the first ones of its order, each carrying no more than the one before it
    went = collections.Counter(burst(REPLICAS, 60))
    loads = [went[i] for i in range(len(REPLICAS))]
    assert loads[0] == max(loads) <= 15 and loads == sorted(loads, reverse=True), loads


def test_there_is_always_a_replica_below_the_bound():
    rng = random.Random(2)
    for _ in range(3000):
        loads = {r: rng.randrange(0, 40) for r in REPLICAS[: rng.randint(1, 5)]}
        chosen = place(rng.choice(KEYS), loads)
        assert loads[chosen] < capacity(loads)


@pytest.mark.parametrize("gone", REPLICAS)
def test_a_replica_removed_moves_only_the_adapters_homed_on_it(gone):
    left = [r for r in REPLICAS if r != gone]
    moved = {k for k in KEYS if home(k, left) != home(k, REPLICAS)}
    assert moved == {k for k in KEYS if home(k, REPLICAS) == gone}
    for key in KEYS[:300]:  # each order only loses the replica: overflow keeps going where it went
        assert rendezvous_order(key, left) == [r for r in rendezvous_order(key, REPLICAS) if r != gone]


def test_a_replica_added_takes_only_the_adapters_that_now_hash_to_it():
    new = "x7k2m9qa"
    moved = {k for k in KEYS if home(k, [*REPLICAS, new]) != home(k, REPLICAS)}
    assert moved == {k for k in KEYS if home(k, [*REPLICAS, new]) == new}
    assert 0.1 < len(moved) / len(KEYS) < 0.25  # about a sixth


def test_base_model_requests_go_to_the_least_loaded_ties_to_the_lowest_id():
    assert place(None, {"b": 2, "a": 3, "c": 1}) == "c"
    assert place(None, {"b": 0, "c": 0, "a": 0}) == "a"
    assert place(None, {"b": 1, "c": 4, "a": 2}) == "b"
    with pytest.raises(ValueError, match="no replica"):
        place(None, {})


# -- the Serve request router, on fake replicas ----------------------------------------------------

class FakeReplica:
    """What Serve's RequestRouter reads of a RunningReplica."""

    def __init__(self, uid: str, max_ongoing_requests: int = 10):
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DeploymentID(name="LoRAModel", app_name="test"))
        self.max_ongoing_requests = max_ongoing_requests
        self.node_id, self.availability_zone, self.multiplexed_model_ids = "node", None, set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _router(replicas):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from serve_app.routing import AdapterHomeRouter

    router = AdapterHomeRouter(deployment_id=DeploymentID(name="LoRAModel", app_name="test"),
                               handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.update_replicas(replicas)
    return router


def _request(n: int, adapter: str | None, user: str = "alice"):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from jaxlora.sampling import SamplingParams
    from serve_app.wire import Generate

    return PendingRequest(args=[Generate((1, 2, 3), SamplingParams(), adapter, user)], kwargs={},
                          metadata=RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}", call_method="generate"))


async def _place(router, request) -> str:
    (chosen,), = await router.choose_replicas(list(router.curr_replicas.values()), request)
    return chosen.replica_id.unique_id


def test_router_reads_the_key_from_the_generate_argument():
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from serve_app.routing import request_key

    async def run():
        stats = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="s", internal_request_id="s"))
        return request_key(_request(0, "faq@v0002", "bob")), request_key(_request(1, None)), request_key(stats)

    assert asyncio.run(run()) == ("bob/faq@v0002", None, None)


def test_router_counts_a_burst_as_it_places_it_and_frees_places_as_requests_end():
    replicas = [FakeReplica("r0"), FakeReplica("r1")]

    async def run():
        router = _router(replicas)
        order = rendezvous_order("alice/hot", ["r0", "r1"])
        burst = [_request(i, "hot") for i in range(10)]
        # Nothing is sent (Serve's queue-length cache never hears of them): the router's own count spreads them.
        went = [await _place(router, r) for r in burst]
        assert [order.index(uid) for uid in went] == [0, 0, 1, 0, 0, 1, 0, 1, 0, 0]  # as placement.place's own test
        for r, uid in list(zip(burst, went))[:6]:  # six end, four of them at home: 3 left there, 1 beside it
            router.on_request_completed(_id(router, uid), r.metadata.internal_request_id)
        # T = 4, capacity ceil(1.25 * 5 / 2) = 4: home (3 -> 4).
        assert await _place(router, _request(10, "hot")) == order[0]
        abandoned = _request(11, "hot")
        assert await _place(router, abandoned) == order[1]  # T = 5, capacity 4, the home carries 4
        abandoned.future.cancel()  # its caller gave up before it was sent: it no longer counts
        assert await _place(router, _request(12, "hot")) == order[1]  # T = 5 again: the same answer (1 -> 2)
        router.on_request_completed(_id(router, order[0]), "i0")  # ended already: changes nothing
        router.on_request_completed(_id(router, order[0]), "i12")  # i12 is not on the home: changes nothing
        # A base-model request goes to the least loaded: beside the home (2) rather than home (4).
        assert await _place(router, _request(13, None)) == order[1]
        router.on_request_completed(_id(router, order[1]), "i12")
        router.on_request_completed(_id(router, order[1]), "i13")
        # Home 4, beside 1: T = 5, capacity 4, beside (1 -> 2). Then one ends at home: 3 + 2, home again.
        assert await _place(router, _request(14, "hot")) == order[1]
        router.on_request_completed(_id(router, order[0]), "i10")
        assert await _place(router, _request(15, "hot")) == order[0]

    asyncio.run(run())


def test_router_leaves_out_a_replica_serve_knows_to_be_full():
    async def run():
        router = _router([FakeReplica("r0", max_ongoing_requests=3), FakeReplica("r1", max_ongoing_requests=3)])
        h, other = rendezvous_order("alice/faq", ["r0", "r1"])
        router.on_new_queue_len_info(_id(router, h), 3)  # the home reported 3 ongoing: full
        assert await _place(router, _request(0, "faq")) == other
        router.on_new_queue_len_info(_id(router, other), 3)  # both full: the rule over all of them, Serve probes it
        assert await _place(router, _request(1, "faq")) == h

    asyncio.run(run())


def test_serve_default_router_path_is_the_one_power_of_two_names():
    from ray.serve._private.constants import DEFAULT_REQUEST_ROUTER_PATH
    from ray.serve.config import RequestRouterConfig

    from serve_app.config import ROUTERS
    from serve_app.routing import AdapterHomeRouter

    assert ROUTERS["power_of_two"] == DEFAULT_REQUEST_ROUTER_PATH
    assert RequestRouterConfig(request_router_class=ROUTERS["adapter_home"]).get_request_router_class().__name__ == \
        AdapterHomeRouter.__name__


def _id(router, uid: str):
    return next(r for r in router.curr_replicas if r.unique_id == uid)
