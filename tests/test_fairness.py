"""Fair admission across tenants (`jaxlora/fairness.py`) in the scheduler's loop, on the mock engine
whose device calls are recorded: which request was prefilled when is exactly who was served."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from jaxlora.adapter_format import LoraAdapter
from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.engine import EngineConfig
from jaxlora.errors import TenantOverLimit
from jaxlora.fairness import TokenCounters
from jaxlora.sampling import SamplingParams
from jaxlora.scheduler import Scheduler
from jaxlora.slots import SlotCache
from tests.engine_fixtures import collect
from tests.mock_engine import MockEngine, tiny_stack

ONE_ROW = EngineConfig(max_batch_size=1, max_seq_len=64, prefill_chunk=8, decode_steps=1, prefill_batch=1,
                       max_queue=512, num_adapter_slots=2, max_lora_rank=1)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _loop(config: EngineConfig, requests: list[tuple[str, list[int], int, float]],
          counters: dict[str, float] | None = None, limits: dict[str, dict] | None = None) -> MockEngine:
    """Submits (tenant, prompt, max_tokens, weight) in order before the loop starts (with the
    tenants' service counters set to `counters`, and `limits[tenant]` as the tenant's own limits),
    runs them all, and returns the engine."""
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: None)
    sched = Scheduler(engine, slots)
    try:
        sched.counters.counters.update(counters or {})
        handles = [sched.submit(prompt, SamplingParams(max_tokens=n, **GREEDY), tenant=t, weight=w, **(limits or {}).get(t, {}))
                   for t, prompt, n, w in requests]
        sched.start()
        for h in handles:
            assert collect(h)[3].reason == "length"
    finally:
        sched.stop()
        slots.close()
    return engine


def _prefilled(engine: MockEngine) -> list[list[tuple[int, ...]]]:
    """The prompts of each prefill call, in order."""
    return [call[1] for call in engine.calls if call[0] == "prefill"]


def _run(config: EngineConfig, requests: list[tuple[str, list[int], int, float]]) -> list[tuple[int, ...]]:
    """The prompts in the order they were prefilled."""
    return [p for call in _prefilled(_loop(config, requests)) for p in call]


def _three_tenants() -> tuple[list, dict]:
    # A: 4 prompt + 2 completion tokens (cost 4 + 2*2 = 8); B: 1 + 1 (cost 3); C: 2 + 3 (cost 8)
    reqs, names = [], {}
    for tenant, prompt_len, max_tokens in (("A", 4, 2), ("B", 1, 1), ("C", 2, 3)):
        for i in range(1, 4):
            prompt = [ord(tenant)] * (prompt_len - 1) + [i]
            names[tuple(prompt)] = f"{tenant}{i}"
            reqs.append((tenant, prompt, max_tokens, 1.0))
    return reqs, names


def test_fair_order_of_three_tenants_worked_by_hand():
    """One row, all nine requests waiting at the start, counters from 0 (ties: the earlier request):
    A1 runs (A=8); B1 (B=3), C1 (C=8); B2 (B=6), B3 (B=9); A2 (A=16), C2 (C=16), A3, C3."""
    reqs, names = _three_tenants()
    order = [names[p] for p in _run(ONE_ROW, reqs)]
    assert order == ["A1", "B1", "C1", "B2", "B3", "A2", "C2", "A3", "C3"]


def test_fifo_keeps_arrival_order():
    reqs, names = _three_tenants()
    order = [names[p] for p in _run(dataclasses.replace(ONE_ROW, scheduling="fifo"), reqs)]
    assert order == ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3"]


TWO_ROWS = EngineConfig(max_batch_size=2, max_seq_len=64, prefill_chunk=8, prefill_tokens_per_turn=None, decode_steps=2, prefill_batch=2,
                        max_queue=1024, num_adapter_slots=2, max_lora_rank=1)
HEAVY, LIGHT = (7, 6), (1, 1)  # (prompt tokens, completion tokens): costs 7 + 2*6 = 19 and 1 + 2*1 = 3


def _cost(size: tuple[int, int], weight: float = 1.0) -> float:
    return (size[0] + TWO_ROWS.completion_token_weight * size[1]) / weight


def _served_gap(config: EngineConfig, weights: dict[str, float], n_heavy: int, n_light: int) -> float:
    """Two tenants, both backlogged from the start: the largest gap between their weighted service
    (each request's whole cost counted when it is prefilled) while both still had requests waiting."""
    reqs = [("heavy", [1] * (HEAVY[0] - 1) + [2], HEAVY[1], weights["heavy"])] * n_heavy \
        + [("light", [3], LIGHT[1], weights["light"])] * n_light
    order = _run(config, reqs)
    served = {"heavy": 0.0, "light": 0.0}
    left = {"heavy": n_heavy, "light": n_light}
    gap = 0.0
    for prompt in order:
        tenant = "heavy" if len(prompt) == HEAVY[0] else "light"
        served[tenant] += _cost(HEAVY if tenant == "heavy" else LIGHT, weights[tenant])
        left[tenant] -= 1
        if min(left.values()) == 0:
            break
        gap = max(gap, abs(served["heavy"] - served["light"]))
    return gap


# The promise: while both wait, weighted service differs by at most the largest request's cost plus
# what the rows already running can still earn (max_batch_size requests' costs): (B + 1) * U.
BOUND = (TWO_ROWS.max_batch_size + 1) * _cost(HEAVY)


def test_two_backlogged_tenants_stay_within_the_bound_over_a_long_run():
    assert _served_gap(TWO_ROWS, {"heavy": 1.0, "light": 1.0}, n_heavy=60, n_light=400) <= BOUND
    # FIFO serves the sixty heavy requests first: the same measure is far past the bound.
    assert _served_gap(dataclasses.replace(TWO_ROWS, scheduling="fifo"), {"heavy": 1.0, "light": 1.0},
                       n_heavy=60, n_light=400) > 10 * BOUND


def test_weights_give_shares_in_proportion():
    # heavy weighs 2: its service divided by 2 keeps pace with light's
    assert _served_gap(TWO_ROWS, {"heavy": 2.0, "light": 1.0}, n_heavy=60, n_light=400) <= BOUND


def test_a_lone_tenant_gets_every_row():
    engine = _loop(dataclasses.replace(TWO_ROWS, max_batch_size=3),
                   [("solo", [i], 5, 1.0) for i in range(6)] + [("other", [9], 1, 1.0)])
    second_generate = [i for i, c in enumerate(engine.calls) if c == ("generate",)][1]
    rows = [r for call in engine.calls[:second_generate] if call[0] == "prefill" for r in call[2]]
    # Every row is taken by the second decode: the other tenant's one request went into the first
    # prefill beside solo's first (it finished there), solo's second took row 2 and was prefilled
    # in the same turn (no row decoded yet), and solo's third took row 1, freed by the other's.
    assert rows == [0, 1, 2, 1]
    assert _prefilled(engine)[:3] == [[(0,), (9,)], [(1,)], [(2,)]]


def test_counters_bank_no_credit_for_idle_time():
    c = TokenCounters(completion_weight=2.0)
    c.activate("a", waiting=[])
    c.activate("b", waiting=["a"])
    c.charge_prompt("b", 3)
    c.charge_prompt("a", 100)  # a was served a lot while b was idle
    c.activate("b", waiting=["a"])  # b comes back: it starts level with a, not 97 tokens behind
    assert c.counters["b"] == c.counters["a"] == 100
    c.charge_completion("a", 5, weight=2.0)  # 2 * 5 / 2
    assert c.counters["a"] == 105
    assert c.least_served(["a", "b"]) == "b"
    c.activate("late", waiting=[])  # nobody waits: it starts at the highest minimum seen (100), not 0
    assert c.counters["late"] == 100


def _first_prefill(config: EngineConfig, counters: dict[str, float], limits: dict | None = None) -> list[tuple[int, ...]]:
    requests = [("a", [1, i], 4, 1.0) for i in range(3)] + [("b", [2], 4, 1.0)]
    return _prefilled(_loop(config, requests, counters, limits))[0]


def test_max_rows_per_tenant_leaves_a_row_for_another_waiting_tenant():
    # "b" was served a lot before, so "a" is far behind: the least served takes both rows
    assert _first_prefill(TWO_ROWS, {"b": 1000.0}) == [(1, 0), (1, 1)]
    limited = dataclasses.replace(TWO_ROWS, max_rows_per_tenant=1)
    assert _first_prefill(limited, {"b": 1000.0}) == [(1, 0), (2,)]  # a holds one row while b waits


def test_a_tenants_own_row_limit_overrides_the_engines():
    limited = dataclasses.replace(TWO_ROWS, max_rows_per_tenant=1)
    # a's tier lifts the limit: it takes both rows again
    assert _first_prefill(limited, {"b": 1000.0}, {"a": {"max_rows": 2}}) == [(1, 0), (1, 1)]
    # and a tier can set a limit the engine does not
    assert _first_prefill(TWO_ROWS, {"b": 1000.0}, {"a": {"max_rows": 1}}) == [(1, 0), (2,)]


def test_max_queued_per_tenant_refuses_only_that_tenant():
    config = dataclasses.replace(TWO_ROWS, max_queued_per_tenant=2)
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(2), lambda r: None)
    sched = Scheduler(engine, slots)  # not started: everything submitted waits
    try:
        for _ in range(2):
            sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), tenant="a")
        with pytest.raises(TenantOverLimit, match="tenant 'a' already has 2 requests waiting"):
            sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), tenant="a")
        sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), tenant="b")  # b is not affected
        for _ in range(3):  # c's own limit is higher
            sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), tenant="c", max_queued=3)
        with pytest.raises(TenantOverLimit, match="tenant 'c' already has 3 requests waiting"):
            sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), tenant="c", max_queued=3)
    finally:
        slots.close()


# -- preemption -------------------------------------------------------------------------------------

PREEMPT = EngineConfig(max_batch_size=2, max_seq_len=64, prefill_chunk=8, decode_steps=1, prefill_batch=2,
                       max_queue=64, num_adapter_slots=3, max_lora_rank=1)


def _flood_then_light(config: EngineConfig, flood_adapter=None, light_adapter=None):
    """Tenant f fills both rows (and queues a third request); once the first decode call is held,
    tenant l sends one short request. Returns the engine, the collected results (f1, f2, f3, l1;
    f1 and f2 without their first token, read to know they were running) and the scheduler's snapshot."""
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: LoraAdapter(r=1, alpha=1.0, use_rslora=False, weights={}))
    sched = Scheduler(engine, slots)
    try:
        for adapter in (flood_adapter, light_adapter):  # in host memory: each request can start at once
            if adapter is not None:
                slots.prefetch(adapter).result()
        engine.gate = gate = threading.Semaphore(0)
        flood = [sched.submit([i], SamplingParams(max_tokens=12, logprobs=1, **GREEDY), flood_adapter, tenant="f")
                 for i in (1, 2, 3)]
        sched.start()
        assert [next(iter(h)).token_id for h in flood[:2]] == [1 + 100 * bool(flood_adapter), 2 + 100 * bool(flood_adapter)]
        light = sched.submit([50], SamplingParams(max_tokens=2, **GREEDY), light_adapter, tenant="l")
        engine.gate = None
        gate.release()
        results = [collect(h) for h in [*flood, light]]
        return engine, results, sched.snapshot(), slots
    finally:
        sched.stop()
        slots.close()


def test_a_light_tenant_takes_a_flooding_tenants_row_which_resumes_where_it_left_off():
    engine, (f1, f2, f3, l1), snap, _ = _flood_then_light(PREEMPT)
    # Counters: f = 2 prompt + 2 * 2 first tokens = 6 when l arrives, so l starts at 6 and its
    # request costs 1 + 2 * 2 = 5. After one decode call f = 10 (gap 4: no), after two f = 14
    # (gap 8 > 5): f's latest request (f2, row 1) goes to host memory and l1 takes its row. Once l1
    # is done f2 comes back, into row 1 on slot 0, before f3 starts.
    assert engine.calls[:8] == [("prefill", [(1,), (2,)], [0, 1]), ("generate",), ("generate",),
                                ("swap_out", 1), ("prefill", [(50,)], [1]), ("generate",), ("swap_in", 1, 0), ("generate",)]
    # f2's tokens and logprobs run on as if it had never left its row (the mock's rule: +1 per token)
    assert f2[0] == list(range(3, 14)) and f2[1] == [-float(n) for n in range(1, 12)]
    assert f1[0] == list(range(2, 13))
    assert l1[0] == [50, 51]
    assert [r[3].preemptions for r in (f1, f2, f3, l1)] == [0, 1, 0, 0]
    assert (snap["preemptions"], snap["swapped_out"]) == (1, 0)


@pytest.mark.parametrize("change", [dict(scheduling="fifo"), dict(max_preemptions=0)], ids=["fifo", "off"])
def test_without_preemption_the_light_request_waits_for_a_row(change):
    engine, (f1, f2, f3, l1), snap, _ = _flood_then_light(dataclasses.replace(PREEMPT, **change))
    assert not [c for c in engine.calls if c[0].startswith("swap")] and snap["preemptions"] == 0
    second = [i for i, c in enumerate(engine.calls) if c[0] == "prefill"][1]
    assert engine.calls[:second].count(("generate",)) == 11  # once f1 and f2 are done: 1 + 11 tokens each
    fifo = change.get("scheduling") == "fifo"
    assert engine.calls[second] == ("prefill", [(3,), (50,)] if fifo else [(50,), (3,)], [0, 1])
    assert f2[0] == list(range(3, 14))


def test_a_preempted_adapter_request_gives_up_its_slot_and_takes_one_again():
    a, b = (ResolvedAdapter("user:t", name, "v0001", Path("/nowhere") / name) for name in "ab")
    # Two adapter slots besides the base: f's rows pin slot 1, l's adapter needs the other one
    engine, (f1, f2, f3, l1), snap, slots = _flood_then_light(PREEMPT, flood_adapter=a, light_adapter=b)
    assert ("swap_out", 1) in engine.calls and ("swap_in", 1, 1) in engine.calls  # back on a's slot
    assert f2[0] == list(range(103, 114)) and l1[0] == [250, 251]  # b was loaded into slot 2
    assert slots._refs == [0, 0, 0]  # nothing stays pinned


def test_a_preemption_that_would_leave_the_row_idle_is_not_made():
    # One adapter slot: l's adapter cannot load while f's other row pins a's slot, so swapping out
    # one of f's rows would only leave it empty. l waits for f's requests instead.
    a, b = (ResolvedAdapter("user:t", name, "v0001", Path("/nowhere") / name) for name in "ab")
    engine, (f1, f2, f3, l1), snap, _ = _flood_then_light(dataclasses.replace(PREEMPT, num_adapter_slots=2), a, b)
    assert snap["preemptions"] == 0 and l1[0] == [150, 151]


@pytest.mark.parametrize("limit", [1, 2])
def test_one_request_is_preempted_at_most_max_preemptions_times(limit):
    config = dataclasses.replace(PREEMPT, max_batch_size=1, max_preemptions=limit)
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: None)
    sched = Scheduler(engine, slots)
    try:
        engine.gate = gate = threading.Semaphore(0)
        long = sched.submit([1], SamplingParams(max_tokens=40, **GREEDY), tenant="f")
        sched.start()
        next(iter(long))
        # l's short requests keep coming back below f's service: every time f is far enough ahead,
        # it would be swapped out again, were it not for the limit
        light = [sched.submit([50 + i], SamplingParams(max_tokens=2, **GREEDY), tenant="l") for i in range(8)]
        engine.gate = None
        gate.release()
        tokens, _, _, fin = collect(long)
        assert all(collect(h)[3].reason == "length" for h in light)
    finally:
        sched.stop()
        slots.close()
    assert tokens == list(range(2, 41)) and fin.preemptions == limit
    assert sum(c[0] == "swap_out" for c in engine.calls) == limit


def test_a_preempted_request_cancelled_while_out_frees_its_host_copy():
    config = dataclasses.replace(PREEMPT, max_batch_size=1)
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: None)
    sched = Scheduler(engine, slots)
    try:
        engine.gate = gate = threading.Semaphore(0)
        long = sched.submit([1], SamplingParams(max_tokens=40, **GREEDY), tenant="f")
        sched.start()
        next(iter(long))
        light = sched.submit([50], SamplingParams(max_tokens=2, **GREEDY), tenant="l")
        gate.release()  # f decodes twice: then f (7) is further ahead of l (0) than l's request costs (5)
        gate.release()
        next(iter(light))  # l was prefilled: f is out, and the loop waits in l's first decode call
        assert sched.snapshot()["swapped_out"] == 1
        long.cancel()
        engine.gate = None
        gate.release()
        assert collect(long)[3].reason == "cancelled" and collect(light)[3].reason == "length"
        assert sched.snapshot()["swapped_out"] == 0
    finally:
        sched.stop()
        slots.close()
