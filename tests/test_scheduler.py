"""The scheduler's loop on the hand-computable mock engine (`tests/mock_engine.py`): exact tokens,
admission order, prefill grouping, retirement inside a multi-step call, adapter slots. What the
real engine adds (bits, parity, compiles) is tested in test_engine.py."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import pytest

from jaxlora.adapter_format import LoraAdapter
from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.engine import EngineConfig
from jaxlora.errors import EngineDead, InvalidRequest, Overloaded
from jaxlora.requests import Finished, PromptLogprobs, TokenEvent
from jaxlora.sampling import SamplingParams, choice_seed
from jaxlora.scheduler import Scheduler
from jaxlora.slots import SlotCache
from tests.engine_fixtures import collect
from tests.mock_engine import MockEngine, tiny_stack

CONFIG = EngineConfig(max_batch_size=3, max_seq_len=64, prefill_chunk=8, prefill_tokens_per_turn=None, decode_steps=4,
                      prefill_batch=2, max_queue=4, num_adapter_slots=3, max_lora_rank=1)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _adapter(name: str) -> ResolvedAdapter:
    return ResolvedAdapter("user:t", name, "v0001", Path("/nowhere") / name)


class _Loader:
    """Adapter reads that finish when the test says so (`release(name)`), or fail."""

    def __init__(self):
        self.gates: dict[str, threading.Event] = {}
        self.broken: set[str] = set()

    def __call__(self, resolved: ResolvedAdapter) -> LoraAdapter:
        gate = self.gates.get(resolved.adapter_id)
        if gate is not None:
            assert gate.wait(timeout=30)
        if resolved.adapter_id in self.broken:
            raise OSError(f"cannot read {resolved.path}")
        return LoraAdapter(r=1, alpha=1.0, use_rslora=False, weights={})


@pytest.fixture
def loop():
    """(scheduler not started, mock engine, loader); stopped after the test."""
    engine, loader = MockEngine(CONFIG), _Loader()
    slots = SlotCache(tiny_stack(CONFIG.num_adapter_slots), loader)
    sched = Scheduler(engine, slots, eos_token_ids=(999,))
    yield sched, engine, loader
    sched.stop()
    slots.close()


def test_tokens_logprobs_and_alternatives_follow_the_rules(loop):
    sched, engine, _ = loop
    h = sched.submit([3, 4], SamplingParams(max_tokens=6, logprobs=2, **GREEDY))
    sched.start()
    tokens, logprobs, tops, fin = collect(h)
    assert tokens == [7, 8, 9, 10, 11, 12]
    assert logprobs == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    assert tops[2] == ((10, -3.0), (11, -4.0))  # the 3rd token (9, n=2): alternatives 9+1, 9+2
    assert (fin.reason, fin.prompt_tokens, fin.completion_tokens) == ("length", 2, 6)
    # one prefill (the first token), then decode calls of 4 steps: 1 + 4 + 4 >= 6
    assert [c[0] for c in engine.calls] == ["prefill", "generate", "generate"]


def test_the_adapter_slot_reaches_the_engine(loop):
    sched, _, _ = loop
    h = sched.submit([3, 4], SamplingParams(max_tokens=2, **GREEDY), _adapter("a"))
    sched.start()
    assert collect(h)[0] == [107, 108]  # slot 1: 3 + 4 + 100


def test_admission_is_oldest_first_and_chunks_share_a_call_by_window(loop):
    sched, engine, _ = loop
    two = SamplingParams(max_tokens=2, **GREEDY)  # the first token at prefill, the second in a decode call
    short1 = sched.submit([1], two)  # one chunk, window 8
    long1 = sched.submit([2] * 9, two)  # two chunks: window 8, then 16
    short2 = sched.submit([3], two)
    short3 = sched.submit([4], two)  # the three rows are taken
    sched.start()
    for h in (short1, long1, short2, short3):
        assert collect(h)[3].reason == "length"
    prefills = [c[1:] for c in engine.calls if c[0] == "prefill"]
    # The oldest (short1) with the next of its window (long1's first chunk): one call of two rows.
    # Three rows wait for their prompts and none decodes, so the turn prefills them all (the
    # idle-row rule) although its budget is one call: long1's last chunk (window 16) goes alone,
    # then short2. The decode call retires all three; short3 takes row 0 and is prefilled alone.
    assert prefills == [([(1,), (2,) * 9], [0, 1]), ([(2,) * 9], [1]), ([(3,)], [2]), ([(4,)], [0])]
    assert [c[0] for c in engine.calls] == ["prefill", "prefill", "prefill", "generate", "prefill", "generate"]


def test_while_a_row_decodes_a_long_prompt_takes_its_budget_of_chunks_a_turn():
    config = dataclasses.replace(CONFIG, prefill_batch=1, prefill_tokens_per_turn=16)  # two chunks of 8 a turn
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: None)
    sched = Scheduler(engine, slots)
    try:
        engine.gate = gate = threading.Semaphore(0)
        streaming = sched.submit([1], SamplingParams(max_tokens=30, **GREEDY))
        sched.start()
        next(iter(streaming))  # decoding; its first decode call is held
        long = sched.submit([2] * 40, SamplingParams(max_tokens=1, **GREEDY))  # five chunks
        engine.gate = None
        gate.release()
        assert collect(long)[0] == [80]
        streaming.cancel()
    finally:
        sched.stop()
        slots.close()
    kinds = [c[0] if c[0] == "generate" else c[2] for c in engine.calls if c[0] in ("generate", "prefill")]
    first = kinds.index([1], 1)  # the long prompt's first chunk (row 1)
    assert kinds[first:first + 8] == [[1], [1], "generate", [1], [1], "generate", [1], "generate"]


BURST = EngineConfig(max_batch_size=16, max_seq_len=4096, prefill_chunk=64, prefill_tokens_per_turn=128, decode_steps=8,
                     prefill_batch=1, num_adapter_slots=2, max_lora_rank=1)


@contextlib.contextmanager
def _mock_scheduler(config: EngineConfig):
    """(scheduler not started, mock engine) on base-model rows; stopped after the block."""
    engine = MockEngine(config)
    slots = SlotCache(tiny_stack(config.num_adapter_slots), lambda r: None)
    sched = Scheduler(engine, slots)
    try:
        yield sched, engine
    finally:
        sched.stop()
        slots.close()


def _between_decodes(calls: list[tuple]) -> list[int]:
    """Prefill calls before each generate call (after the previous one)."""
    counts, n = [], 0
    for c in calls:
        if c[0] == "prefill":
            n += 1
        elif c[0] == "generate":
            counts.append(n)
            n = 0
    return counts


def test_a_burst_arriving_together_is_prefilled_before_the_first_decode_call():
    """The idle-row rule, counted: 16 requests arriving together on 16 rows (prompts of 1 to 4
    chunks, 40 chunks in all, against a budget of 2 a turn) all decode from the first decode call
    on: no row-step waits for a prompt, and the decode calls are the fewest their tokens need."""
    gen, k = 33, BURST.decode_steps
    with _mock_scheduler(BURST) as (sched, engine):
        burst = [sched.submit([1] * (64 * (1 + i % 4)), SamplingParams(max_tokens=gen, **GREEDY)) for i in range(16)]
        sched.start()
        assert all(collect(h)[3].completion_tokens == gen for h in burst)
        snap = sched.snapshot()
        # the first token comes from prefill, the other 32 from 4 calls of 8 steps
        assert (snap["decode_calls"], snap["prompt_wait_row_steps"]) == (-(-(gen - 1) // k), 0)
        assert _between_decodes(engine.calls) == [40, 0, 0, 0]


def test_prompts_that_outnumber_the_decoding_rows_are_prefilled_in_one_turn():
    """14 requests (27 chunks) arrive beside 2 decoding streams: they outnumber them, so they are
    all prefilled before the next decode call, although the budget is 2 chunks a turn."""
    gen = 33
    with _mock_scheduler(BURST) as (sched, engine):
        engine.gate = gate = threading.Semaphore(0)
        streams = [sched.submit([2], SamplingParams(max_tokens=200, **GREEDY)) for _ in range(2)]
        sched.start()
        for h in streams:
            next(iter(h))  # both decode; their first decode call is held
        late = [sched.submit([3] * (64 * (1 + i % 3)), SamplingParams(max_tokens=gen, **GREEDY)) for i in range(14)]
        engine.gate = None
        gate.release()
        assert all(collect(h)[3].completion_tokens == gen for h in late)
        for h in streams:
            h.cancel()
            collect(h)
        assert sched.snapshot()["prompt_wait_row_steps"] == 0
        assert _between_decodes(engine.calls)[:3] == [2, 27, 0]  # the streams' prompts, then all 14


def test_long_prompts_beside_more_decoding_streams_take_the_budget_a_turn():
    """The other side of the rule, counted: two 2048-token prompts (32 chunks each) arrive beside 4
    decoding streams, which outnumber them. Between two decode calls at most the budget (2 chunks)
    runs, so a stream's gap grows by at most 2 chunks; each long prompt's row waits exactly the
    decode calls its chunks need at 2 a turn, oldest first (15 calls for the first, 31 for the second)."""
    config = dataclasses.replace(BURST, max_batch_size=6)
    k = config.decode_steps
    with _mock_scheduler(config) as (sched, engine):
        streams = [sched.submit([2], SamplingParams(max_tokens=3000, **GREEDY)) for _ in range(4)]
        sched.start()
        for h in streams:
            next(iter(h))  # all four decode
        engine.gate = gate = threading.Semaphore(0)
        assert engine.held.wait(timeout=30)  # the loop waits inside a decode call
        long = [sched.submit([5] * 2048, SamplingParams(max_tokens=1, **GREEDY)) for _ in range(2)]
        waited = sched.snapshot()["prompt_wait_row_steps"]
        engine.calls.clear()
        engine.gate = None
        gate.release()
        assert [collect(h)[0] for h in long] == [[2048 * 5 % 1000]] * 2
        for h in streams:
            h.cancel()
            collect(h)
        prefills = _between_decodes(engine.calls)
        assert max(prefills) == 2 and sum(prefills) == 64
        assert sched.snapshot()["prompt_wait_row_steps"] - waited == (15 + 31) * k


def test_a_request_done_at_prefill_never_holds_a_row(loop):
    sched, engine, _ = loop
    handles = [sched.submit([i], SamplingParams(max_tokens=1, **GREEDY)) for i in range(5)]
    sched.start()
    assert [collect(h)[0] for h in handles] == [[0], [1], [2], [3], [4]]
    assert ("generate",) not in engine.calls
    assert [c[2] for c in engine.calls if c[0] == "prefill"] == [[0, 1], [2], [0, 1]]


def test_a_stop_token_inside_a_decode_call_retires_the_row_there(loop):
    sched, engine, _ = loop
    stop = sched.submit([3, 4], SamplingParams(max_tokens=20, stop_token_ids=(9,), **GREEDY))
    eos = sched.submit([996], SamplingParams(max_tokens=20, temperature=0.0))  # 996, 997, 998, 999 = EOS
    ignore = sched.submit([996], SamplingParams(max_tokens=5, **GREEDY))  # ignore_eos: 999 is a token
    sched.start()
    tokens, _, _, fin = collect(stop)
    assert tokens == [7, 8, 9] and fin.reason == "stop"
    tokens, _, _, fin = collect(eos)
    assert tokens == [996, 997, 998, 999] and fin.reason == "stop"
    tokens, _, _, fin = collect(ignore)
    assert tokens == [996, 997, 998, 999, 0] and fin.reason == "length"
    assert sched.free_rows() == 3


def _choices(handle) -> tuple[list[PromptLogprobs], dict[int, list[int]], dict[int, Finished]]:
    """Every event of a request: its prompt logprobs events, and each choice's tokens and Finished."""
    prompt, tokens, ends = [], {}, {}
    for ev in handle:
        if isinstance(ev, PromptLogprobs):
            prompt.append(ev)
        elif isinstance(ev, TokenEvent):
            assert ev.choice not in ends, "a token after its choice's Finished"
            tokens.setdefault(ev.choice, []).append(ev.token_id)
        else:
            ends[ev.choice] = ev
    return prompt, tokens, ends


def test_n_choices_prefill_the_prompt_once_and_fork_it(loop):
    sched, engine, _ = loop
    h = sched.submit([3, 4], SamplingParams(max_tokens=3, n=3, seed=5, **GREEDY), _adapter("a"))
    sched.start()
    _, tokens, ends = _choices(h)
    first = [107] + [(107 + choice_seed(5, i)) % 1000 for i in (1, 2)]  # slot 1; a forked choice's own seed
    assert tokens == {i: [t, t + 1, t + 2] for i, t in enumerate(first)}
    assert {i: (f.reason, f.seed, f.completion_tokens) for i, f in ends.items()} == {
        i: ("length", choice_seed(5, i), 3) for i in range(3)}
    calls = [c for c in engine.calls if c[0] in ("prefill", "fork")]
    assert calls == [("prefill", [(3, 4)], [0]), ("fork", 0, (1, 2))]
    assert sched.free_rows() == 3 and sched.slots._refs[1] == 0  # every choice's row and slot pin given back


def test_a_request_of_n_choices_waits_until_its_rows_are_all_free(loop):
    sched, engine, _ = loop
    running = sched.submit([1], SamplingParams(max_tokens=6, **GREEDY))
    group = sched.submit([2], SamplingParams(max_tokens=1, n=3, seed=0, **GREEDY))
    after = sched.submit([9], SamplingParams(max_tokens=1, **GREEDY))  # does not pass the group in the queue
    sched.start()
    assert collect(running)[0] == [1, 2, 3, 4, 5, 6]
    assert _choices(group)[1] == {0: [2], 1: [2 + choice_seed(0, 1) % 1000], 2: [(2 + choice_seed(0, 2)) % 1000]}
    assert collect(after)[0] == [9]
    prefills = [c[1] for c in engine.calls if c[0] == "prefill"]
    assert prefills == [[(1,)], [(2,)], [(9,)]]
    # the group's prefill comes after the running request's last decode call (2: 1 + 4 + 4 >= 6)
    assert engine.calls.index(("prefill", [(2,)], [0])) > max(i for i, c in enumerate(engine.calls) if c == ("generate",)
                                                               and i < engine.calls.index(("prefill", [(2,)], [0])))


def test_more_choices_than_rows_are_refused(loop):
    sched, _, _ = loop
    with pytest.raises(InvalidRequest, match="n \\(4\\) exceeds") as e:
        sched.submit([1], SamplingParams(max_tokens=1, n=4))
    assert e.value.param == "n"


def test_cancelling_a_request_ends_every_choice_even_those_waiting_for_the_prompt(loop):
    sched, engine, _ = loop
    engine.gate = gate = threading.Semaphore(0)
    busy = sched.submit([1], SamplingParams(max_tokens=50, **GREEDY))
    sched.start()
    next(iter(busy))
    group = sched.submit([2] * 30, SamplingParams(max_tokens=5, n=2, **GREEDY))  # 4 chunks, one a turn
    engine.held.clear()
    gate.release()  # the next turn places the group and prefills its first chunk
    assert engine.held.wait(timeout=30)  # held in the decode call after it
    assert sched.snapshot()["prefilling_rows"] == 1 and sched.free_rows() == 0
    group.cancel()
    engine.gate = None
    gate.release()
    _, tokens, ends = _choices(group)
    assert {i: f.reason for i, f in ends.items()} == {0: "cancelled", 1: "cancelled"} and not tokens
    assert not any(c[0] == "fork" for c in engine.calls)
    assert collect(busy)[3].reason == "length"
    assert sched.free_rows() == 3


def test_prompt_logprobs_come_first_and_skip_the_prefix_cache(loop):
    sched, engine, _ = loop
    prompt = list(range(10, 30))  # 20 tokens: chunks of 8 at 0, 8, 16
    plain = sched.submit(prompt, SamplingParams(max_tokens=1, **GREEDY))
    sched.start()
    collect(plain)  # its complete chunks (0 and 8) are in the prefix cache now
    again = sched.submit(prompt, SamplingParams(max_tokens=2, prompt_logprobs=2, **GREEDY))
    events = list(again)
    assert isinstance(events[0], PromptLogprobs) and isinstance(events[1], TokenEvent)
    lp = events[0]
    assert lp.logprobs == tuple(-t / 1000 for t in prompt[1:])  # the mock's rule: -t / VOCAB, token 0 has none
    assert lp.top_logprobs[4] == ((prompt[5] + 1, -(prompt[5] + 1) / 1000), (prompt[5] + 2, -(prompt[5] + 2) / 1000))
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [sum(prompt) % 1000, sum(prompt) % 1000 + 1]
    # every chunk prefilled again: a cached chunk holds keys and values, not the logits it gave
    assert [c[0] for c in engine.calls].count("put_chunk") == 0
    assert [c[0] for c in engine.calls].count("prefill") == 6 and events[-1].cached_tokens == 0
    cached = sched.submit(prompt, SamplingParams(max_tokens=1, **GREEDY))  # without logprobs: the cache serves
    assert collect(cached)[3].cached_tokens == 16


def test_max_tokens_none_fills_the_context(loop):
    sched, _, _ = loop
    h = sched.submit([5] * 10, SamplingParams(max_tokens=None, **GREEDY))
    sched.start()
    tokens, _, _, fin = collect(h)
    assert len(tokens) == CONFIG.max_seq_len - 10 and fin.reason == "length"


def test_while_the_loop_is_held_requests_wait_and_the_queue_is_bounded(loop):
    sched, engine, _ = loop
    engine.gate = gate = threading.Semaphore(0)  # every generate call waits for a release
    running = [sched.submit([i], SamplingParams(max_tokens=5, **GREEDY)) for i in range(3)]
    sched.start()
    # all three are prefilled before the held decode call (none decodes yet: the idle-row rule),
    # the first two in one call
    assert [next(iter(h)).token_id for h in running[:2]] == [0, 1]
    waiting = [sched.submit([7], SamplingParams(max_tokens=1, **GREEDY)) for _ in range(CONFIG.max_queue)]
    with pytest.raises(Overloaded, match="4 requests waiting"):
        sched.submit([7], SamplingParams(max_tokens=1, **GREEDY))
    snap = sched.snapshot()
    assert (snap["queue_depth"], snap["active_rows"]) == (4, 3)
    engine.gate = None  # later calls pass freely
    gate.release()  # and the held one
    assert all(collect(h)[3].reason == "length" for h in running + waiting)


def test_cancelling_a_running_row_frees_it_for_the_next_request(loop):
    sched, engine, _ = loop
    engine.gate = gate = threading.Semaphore(0)
    rows = [sched.submit([i], SamplingParams(max_tokens=50, **GREEDY)) for i in range(3)]
    late = sched.submit([100], SamplingParams(max_tokens=2, **GREEDY))
    sched.start()
    for h in rows[:2]:  # prefilled in the first call; the third row's prompt waits for the held decode
        next(iter(h))
    rows[1].cancel()
    gate.release()  # this call still computes row 1; the next turn retires it and admits `late`
    engine.gate = None
    gate.release()
    tokens, _, _, fin = collect(late)
    assert tokens == [100, 101] and fin.reason == "length"
    assert collect(rows[1])[3].reason == "cancelled"
    # `late` took the cancelled request's row
    assert [c[2][c[1].index((100,))] for c in engine.calls if c[0] == "prefill" and (100,) in c[1]] == [1]
    for h in (rows[0], rows[2]):
        h.cancel()


def test_an_adapter_being_read_holds_up_only_its_request(loop):
    sched, _, loader = loop
    loader.gates["slow"] = gate = threading.Event()
    slow = sched.submit([1], SamplingParams(max_tokens=2, **GREEDY), _adapter("slow"))
    base = sched.submit([2], SamplingParams(max_tokens=3, **GREEDY))
    sched.start()
    assert collect(base)[0] == [2, 3, 4]
    assert not gate.is_set()
    gate.set()
    assert collect(slow)[0] == [101, 102]


def test_with_every_slot_pinned_a_request_waits_in_place(loop):
    sched, engine, _ = loop
    # two adapter slots (slot 0 is the base model): a third adapter waits until one is released
    engine.gate = gate = threading.Semaphore(0)
    a = sched.submit([1], SamplingParams(max_tokens=6, **GREEDY), _adapter("a"))
    b = sched.submit([1], SamplingParams(max_tokens=6, **GREEDY), _adapter("b"))
    sched.start()
    assert [next(iter(h)).token_id for h in (a, b)] == [101, 201]
    c = sched.submit([1], SamplingParams(max_tokens=1, **GREEDY), _adapter("c"))
    engine.gate = None
    gate.release()
    assert collect(c)[0] == [101]  # slot 1 again, once a's row was retired and its slot unpinned
    assert [c_[2] for c_ in engine.calls if c_[0] == "prefill"] == [[0, 1], [0]]
    assert collect(a)[3].reason == collect(b)[3].reason == "length"


def test_a_failed_adapter_read_fails_only_its_request(loop):
    sched, _, loader = loop
    loader.broken.add("bad")
    bad = sched.submit([1], SamplingParams(max_tokens=2, **GREEDY), _adapter("bad"))
    good = sched.submit([1], SamplingParams(max_tokens=2, **GREEDY))
    sched.start()
    fin = collect(bad)[3]
    assert fin.reason == "error" and "cannot read /nowhere/bad" in str(fin.error)
    assert collect(good)[0] == [1, 2] and sched.healthy


def test_a_failed_device_call_fails_every_request_and_the_loop(loop):
    sched, engine, _ = loop
    engine.fail_next_generate = RuntimeError("device fell over")
    handles = [sched.submit([i], SamplingParams(max_tokens=5, **GREEDY)) for i in range(5)]  # 3 run, 2 wait
    sched.start()
    for h in handles:
        fin = collect(h)[3]
        assert fin.reason == "error" and "device fell over" in str(fin.error)
    sched._thread.join(timeout=10)
    assert not sched.healthy
    with pytest.raises(EngineDead, match="engine has stopped.*device fell over"):
        sched.submit([1], SamplingParams())


def test_batches_send_the_first_token_alone_then_interval_tokens_at_a_time():
    """`RequestHandle.batches(interval)` (the serving layer's stream_interval): the consumer is woken
    for the first event, then only once `interval` events wait or the last one has come."""
    import asyncio

    from jaxlora.requests import Finished, RequestHandle, TokenEvent, TokenStream

    stream = TokenStream()
    handle = RequestHandle(None, stream, lambda: None)
    got: list[list[int | str]] = []

    async def consume():
        async for batch in handle.batches(3):
            got.append([e.token_id if isinstance(e, TokenEvent) else "end" for e in batch])

    async def run():
        async def settle():  # lets a woken consumer run before the next event
            for _ in range(10):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await settle()
        for token in range(8):
            stream.put(TokenEvent(token, 0.0, ()))
            await settle()
        stream.put(Finished("length", 1, 8, 0.0, None, 0, None))
        await task

    asyncio.run(run())
    assert got == [[0], [1, 2, 3], [4, 5, 6], [7, "end"]]


def test_paced_batches_wait_the_pacers_gap_and_the_last_event_never_waits():
    """`batches(pacer=...)` (the serving layer's stream_messages_per_s): after the first batch the next
    waits the pacer's gap at least, however many events come meanwhile; the Finished that ends the
    request is handed over at once, gap or not."""
    import asyncio
    import time

    from jaxlora.requests import Finished, MessagePacer, RequestHandle, TokenEvent, TokenStream

    stream = TokenStream()
    handle = RequestHandle(None, stream, lambda: None)
    pacer = MessagePacer(5.0)  # one stream: 0.2 s between its messages
    got: list[tuple[float, list[int | str]]] = []

    async def run():
        new_batch = asyncio.Event()

        async def consume():
            async for batch in handle.batches(1, pacer):
                got.append((time.monotonic(), [e.token_id if isinstance(e, TokenEvent) else "end" for e in batch]))
                new_batch.set()

        async def next_batch():
            await asyncio.wait_for(new_batch.wait(), 30)
            new_batch.clear()

        task = asyncio.create_task(consume())
        stream.put(TokenEvent(0, 0.0, ()))
        await next_batch()
        for token in (1, 2, 3):
            stream.put(TokenEvent(token, 0.0, ()))
        await next_batch()  # after the 0.2 s gap, all three at once
        pacer.per_second = 1 / 3600  # the next gap is an hour: only Finished ends it
        stream.put(TokenEvent(4, 0.0, ()))
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(got) == 2  # inside the gap: nothing handed over
        stream.put(Finished("length", 1, 5, 0.0, None, 0, None))
        await next_batch()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert [b for _, b in got] == [[0], [1, 2, 3], [4, "end"]]
    assert got[1][0] - got[0][0] >= 0.2
    assert pacer.streams == 0  # the finished stream gave its share back


def test_streams_share_one_pacers_budget_from_their_first_message_until_they_end():
    """The gap is streams / per_second: a stream counts once its first message is out (a request still
    waiting for its first token sends nothing) and stops counting when it ends or its consumer leaves."""
    import asyncio

    from jaxlora.requests import Finished, MessagePacer, RequestHandle, TokenEvent, TokenStream

    pacer = MessagePacer(10.0)
    streams = [TokenStream() for _ in range(3)]
    gaps: list[tuple[str, int, float]] = []

    async def run():
        batches = [RequestHandle(None, s, lambda: None).batches(1, pacer) for s in streams]
        for i in (0, 1):
            streams[i].put(TokenEvent(0, 0.0, ()))
            await anext(batches[i])  # the first message: not yet counted, it waits for nothing
            gaps.append(("first out", i, pacer.gap()))
        waiting = asyncio.ensure_future(anext(batches[0]))  # counted from here: asks for the next message
        await asyncio.sleep(0)
        gaps.append(("stream 0 paced", 0, pacer.gap()))
        waiting1 = asyncio.ensure_future(anext(batches[1]))
        await asyncio.sleep(0)
        gaps.append(("stream 1 paced", 1, pacer.gap()))
        streams[0].put(Finished("length", 1, 1, 0.0, None, 0, None))
        await asyncio.wait_for(waiting, 30)
        try:
            await anext(batches[0])
        except StopAsyncIteration:
            pass
        gaps.append(("stream 0 ended", 0, pacer.gap()))
        waiting1.cancel()  # its consumer left while it waited
        await asyncio.gather(waiting1, return_exceptions=True)
        gaps.append(("stream 1 left", 1, pacer.gap()))
        streams[2].put(TokenEvent(0, 0.0, ()))
        await anext(batches[2])
        gaps.append(("first out", 2, pacer.gap()))
        streams[2].put(TokenEvent(1, 0.0, ()))
        await asyncio.wait_for(anext(batches[2]), 30)  # after its gap
        gaps.append(("stream 2 paced", 2, pacer.gap()))
        await batches[2].aclose()  # its consumer left between messages (the deployment's aclosing)
        gaps.append(("stream 2 left", 2, pacer.gap()))

    asyncio.run(run())
    assert gaps == [("first out", 0, 0.0), ("first out", 1, 0.0), ("stream 0 paced", 0, 0.1),
                    ("stream 1 paced", 1, 0.2), ("stream 0 ended", 0, 0.1), ("stream 1 left", 1, 0.0),
                    ("first out", 2, 0.0), ("stream 2 paced", 2, 0.1), ("stream 2 left", 2, 0.0)]
    assert pacer.streams == 0
