"""The engine and its scheduler: parity with transformers + PEFT, determinism inside any batch,
no recompilation after warm-up, nothing lost under many requests, cancellation and limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from jaxlora.hf_checkpoint import model_fingerprint
from jaxlora.engine import compile_count
from jaxlora.errors import InvalidRequest, Overloaded
from jaxlora.replica import build_slots
from jaxlora.requests import Finished, PromptLogprobs, TokenEvent
from jaxlora.sampling import SamplingParams
from jaxlora.scheduler import Scheduler
from tests.engine_fixtures import build_tiny_engine, collect
from tests.peft_adapters import load_peft, peft_greedy, peft_logits

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory):
    return build_tiny_engine(tiny_checkpoints["llama_gqa"], tmp_path_factory.mktemp("engine"))


def _prompt(rng, n, vocab=211):
    return rng.integers(3, vocab, size=n).tolist()


def test_concurrent_greedy_equals_peft_generate_alone(tiny):
    rng = np.random.default_rng(0)
    jobs = [(None, 5), ("a_qv_r4", 12), ("b_all_r8_rslora", 3), ("c_mlp_r2", 20), ("a_qv_r4", 7), (None, 16)]
    prompts = [_prompt(rng, n) for _, n in jobs]
    sched = tiny.scheduler()
    try:
        handles = [sched.submit(p, SamplingParams(max_tokens=24, **GREEDY), tiny.adapters.get(a)) for (a, _), p in zip(jobs, prompts)]
        results = [collect(h)[0] for h in handles]
    finally:
        sched.stop()
    peft_model = load_peft(tiny.base_dir, tiny.peft_dirs)
    for (adapter, _), p, got in zip(jobs, prompts, results):
        assert got == peft_greedy(peft_model, adapter, p, 24), adapter


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234)],
                         ids=["greedy", "seeded"])
def test_needle_is_bitwise_identical_alone_and_in_any_batch(tiny, sampling):
    rng = np.random.default_rng(1)
    needle = (_prompt(rng, 11), SamplingParams(max_tokens=20, ignore_eos=True, logprobs=5, **sampling), tiny.adapters["b_all_r8_rslora"])
    alone = tiny.scheduler()
    try:
        expected = collect(alone.submit(*needle))
    finally:
        alone.stop()
    names = [None, *tiny.adapters]
    for trial in range(5):
        position = int(rng.integers(0, 8))
        fillers = [(_prompt(rng, int(rng.integers(1, 30))),
                    SamplingParams(max_tokens=int(rng.integers(4, 30)), temperature=float(rng.choice([0.0, 1.0])),
                                   seed=int(rng.integers(0, 2**31)), ignore_eos=True),
                    tiny.adapters.get(names[int(rng.integers(0, len(names)))])) for _ in range(10)]
        got = tiny.run_at_row(needle, fillers, position)
        assert got[0] == expected[0], f"trial {trial}: tokens differ at row {position}"
        assert got[1] == expected[1], f"trial {trial}: logprobs differ"  # bitwise: float equality
        assert got[2] == expected[2]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=0.9, top_p=0.9, seed=99, frequency_penalty=0.5, presence_penalty=0.3,
                                           repetition_penalty=1.2)], ids=["greedy", "seeded-penalties"])
def test_needle_swapped_out_and_resumed_in_another_row_is_bitwise_identical(tiny, sampling, monkeypatch):
    """Fair scheduling with a forced preemption: the needle's tenant is made the most served, so
    once another tenant's requests wait for a row the needle's row goes to host memory mid-stream;
    it comes back into whichever row frees first. Its tokens, logprobs and alternatives must not change."""
    rng = np.random.default_rng(3)
    needle = (_prompt(rng, 13), SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3, **sampling), tiny.adapters["a_qv_r4"])
    alone = tiny.scheduler()
    try:
        expected = collect(alone.submit(*needle))
    finally:
        alone.stop()
    rows = []  # (swap_out row, swap_in row)
    swap_out, swap_in, generate = tiny.engine.swap_out, tiny.engine.swap_in, tiny.engine.generate
    gate: list[threading.Semaphore] = []  # while it holds one, each decode call waits for a release

    def gated_generate(lora, state):
        if gate:
            gate[0].acquire()
        return generate(lora, state)

    monkeypatch.setattr(tiny.engine, "generate", gated_generate)
    monkeypatch.setattr(tiny.engine, "swap_out", lambda state, row: rows.append(row) or swap_out(state, row))
    monkeypatch.setattr(tiny.engine, "swap_in", lambda saved, state, row, slot: rows.append(row) or swap_in(saved, state, row, slot))
    names = [None, *tiny.adapters]
    before = compile_count()
    for trial in range(3):
        sched = tiny.scheduler(start=False)
        try:
            sched.counters.counters["needle"] = 1e6
            handle = sched.submit(*needle, tenant="needle")
            gate[:] = [threading.Semaphore(2)]  # two decode calls, then the loop waits in the third
            sched.start()
            head = [next(iter(handle)) for _ in range(1 + 2 * tiny.engine.config.decode_steps)]
            fillers = [sched.submit(_prompt(rng, int(rng.integers(1, 30))),
                                    SamplingParams(max_tokens=int(rng.integers(4, 30)), temperature=float(rng.choice([0.0, 1.0])),
                                                   seed=int(rng.integers(0, 2**31)), ignore_eos=True),
                                    tiny.adapters.get(names[int(rng.integers(0, len(names)))]), tenant="fill")
                       for _ in range(12)]
            held = gate.pop()
            held.release()
            tokens, logprobs, tops, fin = collect(handle)
            for h in fillers:
                assert collect(h)[3].reason == "length"
        finally:
            sched.stop()
        assert fin.preemptions == 1, f"trial {trial}: the needle was not preempted"
        assert [e.token_id for e in head] + tokens == expected[0], f"trial {trial}: tokens differ (rows {rows})"
        assert [e.logprob for e in head] + logprobs == expected[1], f"trial {trial}: logprobs differ"  # bitwise
        assert [e.top_logprobs for e in head] + tops == expected[2]
    assert any(rows[i] != rows[i + 1] for i in range(0, len(rows), 2)), f"never resumed in another row: {rows}"
    assert compile_count() - before == 0


def _events(handle) -> tuple[PromptLogprobs | None, dict[int, tuple[list, list, list]], dict[int, Finished]]:
    """A request's prompt logprobs, and per choice its (tokens, logprobs, alternatives) and Finished."""
    prompt, choices, ends = None, {}, {}
    for ev in handle:
        if isinstance(ev, PromptLogprobs):
            prompt = ev
        elif isinstance(ev, TokenEvent):
            for column, value in zip(choices.setdefault(ev.choice, ([], [], [])), (ev.token_id, ev.logprob, ev.top_logprobs)):
                column.append(value)
        else:
            ends[ev.choice] = ev
    return prompt, choices, ends


def test_prompt_logprobs_equal_transformers_log_softmax_cached_prompt_or_not(tiny):
    """Each prompt token's logprob given the tokens before it, and the top 5, against the log-softmax
    of transformers + PEFT's logits over the same prompt: on the base model and on adapters, for
    prompts of one to four chunks, and after a plain request put the prompt's chunks in the prefix
    cache (whose hits a prompt-logprobs request does not take: it prefills every chunk)."""
    rng = np.random.default_rng(5)
    jobs = [(None, 2), ("a_qv_r4", 8), ("b_all_r8_rslora", 20), (None, 31), ("c_mlp_r2", 13)]
    prompts = [_prompt(rng, n) for _, n in jobs]
    sched = tiny.scheduler()
    try:
        for (adapter, _), p in zip(jobs[2:], prompts[2:]):  # these prompts' complete chunks are now cached
            assert collect(sched.submit(p, SamplingParams(max_tokens=1, **GREEDY), tiny.adapters.get(adapter)))[3].reason
        handles = [sched.submit(p, SamplingParams(max_tokens=2, prompt_logprobs=5, **GREEDY), tiny.adapters.get(a))
                   for (a, _), p in zip(jobs, prompts)]
        results = [_events(h) for h in handles]
    finally:
        sched.stop()
    peft_model = load_peft(tiny.base_dir, tiny.peft_dirs)
    for (adapter, _), p, (prompt, choices, ends) in zip(jobs, prompts, results):
        logprobs_TxV = torch.log_softmax(torch.from_numpy(peft_logits(peft_model, adapter, p)), dim=-1).numpy()
        expected = logprobs_TxV[np.arange(len(p) - 1), p[1:]]
        assert len(prompt.logprobs) == len(p) - 1 and ends[0].cached_tokens == 0
        np.testing.assert_allclose(prompt.logprobs, expected, atol=1e-4, err_msg=str(adapter))
        top_ids = [[t for t, _ in top] for top in prompt.top_logprobs]
        top_lps = [[lp for _, lp in top] for top in prompt.top_logprobs]
        np.testing.assert_allclose(top_lps, -np.sort(-logprobs_TxV[:-1], axis=-1)[:, :5], atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(logprobs_TxV[:-1], np.array(top_ids), axis=-1), top_lps, atol=1e-4)
        assert choices[0][0][0] == int(np.argmax(logprobs_TxV[-1]))  # the first token: the prompt's next


def test_n_seeded_choices_are_the_same_alone_and_in_any_batch(tiny):
    """n=4 with a seed: the prompt prefilled once, forked into three more rows; each choice draws from
    its own random stream, so the four are not all alike, and a choice's tokens, logprobs and
    alternatives are bitwise the same whether the request runs alone or among others, at any row."""
    rng = np.random.default_rng(6)
    needle = (_prompt(rng, 19), SamplingParams(max_tokens=12, temperature=1.0, seed=2024, n=4, logprobs=2, ignore_eos=True),
              tiny.adapters["b_all_r8_rslora"])
    sched = tiny.scheduler()
    try:
        _, alone, ends = _events(sched.submit(*needle))
    finally:
        sched.stop()
    assert sorted(alone) == [0, 1, 2, 3] and len({tuple(c[0]) for c in alone.values()}) > 1
    assert sorted(ends) == [0, 1, 2, 3] and all(f.completion_tokens == 12 for f in ends.values())
    names = [None, *tiny.adapters]
    for trial in range(3):
        before = int(rng.integers(0, 4))
        fillers = [(_prompt(rng, int(rng.integers(1, 30))),
                    SamplingParams(max_tokens=int(rng.integers(4, 30)), temperature=float(rng.choice([0.0, 1.0])),
                                   seed=int(rng.integers(0, 2**31)), ignore_eos=True),
                    tiny.adapters.get(names[int(rng.integers(0, len(names)))])) for _ in range(6)]
        sched = tiny.scheduler(start=False)
        try:
            others = [sched.submit(*f) for f in fillers[:before]]
            handle = sched.submit(*needle)
            others += [sched.submit(*f) for f in fillers[before:]]
            sched.start()
            _, batched, _ = _events(handle)
            for h in others:
                collect(h)
        finally:
            sched.stop()
        assert batched == alone, f"trial {trial}: choices differ beside {before} requests ahead"


def test_tokens_do_not_depend_on_the_adapter_slot(tiny):
    """Which device slot an adapter lands in depends on what else was loaded (and evicted) before;
    a request's tokens and logprobs must not."""
    rng = np.random.default_rng(3)
    needle = (_prompt(rng, 9), SamplingParams(max_tokens=16, temperature=0.8, seed=77, logprobs=3, ignore_eos=True),
              tiny.adapters["b_all_r8_rslora"])
    config, fingerprint = tiny.engine.config, model_fingerprint(tiny.base_dir)
    results, slots_used = [], []
    for loaded_first in ([], ["a_qv_r4", "c_mlp_r2"]):
        slots = build_slots(tiny.engine.model_config, config, fingerprint)
        for name in loaded_first:
            slots.release(slots.acquire(tiny.adapters[name]))
        slots_used.append(slots.acquire(needle[2]))
        slots.release(slots_used[-1])
        sched = Scheduler(tiny.engine, slots, tiny.engine.model_config.eos_token_ids)
        sched.start()
        try:
            results.append(collect(sched.submit(*needle))[:3])
        finally:
            sched.stop()
            slots.close()
    assert slots_used[0] != slots_used[1]
    assert results[0] == results[1]  # tokens, logprobs and alternatives, bitwise


def test_no_compilation_after_warm_up(tiny):
    rng = np.random.default_rng(2)
    names = [None, *tiny.adapters]
    sched = tiny.scheduler()
    try:
        before = compile_count()
        handles = [sched.submit(_prompt(rng, int(rng.integers(1, 40))),
                                SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=float(rng.choice([0.0, 0.7])),
                                               top_k=int(rng.integers(0, 50)), logprobs=int(rng.integers(0, 6)),
                                               n=int(rng.choice([1, 1, 3])), prompt_logprobs=[None, 2][int(rng.integers(2))]),
                                tiny.adapters.get(names[int(rng.integers(0, len(names)))]))
                   for _ in range(50)]
        for h in handles:
            assert all(e.reason in ("stop", "length") for e in h if isinstance(e, Finished))
        assert compile_count() - before == 0
    finally:
        sched.stop()


def test_200_requests_through_8_rows_none_lost_or_duplicated(tiny):
    rng = np.random.default_rng(3)
    names = [None, *tiny.adapters]
    sched = tiny.scheduler()
    try:
        wanted, handles = [], []
        for _ in range(200):
            n = int(rng.integers(1, 12))
            wanted.append(n)
            handles.append(sched.submit(_prompt(rng, int(rng.integers(1, 20))), SamplingParams(max_tokens=n, **GREEDY),
                                        tiny.adapters.get(names[int(rng.integers(0, len(names)))])))
        results = [collect(h) for h in handles]
        assert [len(r[0]) for r in results] == wanted
        assert all(r[3].reason == "length" and r[3].completion_tokens == n for r, n in zip(results, wanted))
        assert sched.free_rows() == 8
        m = sched.snapshot()
        assert m["requests_finished"] == 200 and m["queue_depth"] == 0 and m["active_rows"] == 0
    finally:
        sched.stop()


def test_cancel_frees_the_row_at_once(tiny):
    sched = tiny.scheduler()
    try:
        h = sched.submit([5, 6, 7], SamplingParams(max_tokens=60, **GREEDY))
        next(iter(h))  # the first token: the request holds a row
        assert sched.free_rows() == 7
        h.cancel()
        rest = list(h)
        assert rest[-1].reason == "cancelled" and rest[-1].completion_tokens < 60
        assert rest[-1].completion_tokens == len(rest)  # the first token, and every one streamed after it
        assert sched.free_rows() == 8
        queued = [sched.submit([5], SamplingParams(max_tokens=60, **GREEDY)) for _ in range(10)]
        queued[-1].cancel()  # still waiting: leaves the queue
        assert list(queued[-1])[-1].reason == "cancelled"
        for q in queued[:-1]:
            q.cancel()
        assert all(list(q)[-1].reason == "cancelled" for q in queued[:-1])
        assert sched.free_rows() == 8
    finally:
        sched.stop()


def test_stop_tokens_and_eos(tiny):
    sched = tiny.scheduler()
    try:
        tokens, *_ = collect(sched.submit([9, 8, 7], SamplingParams(max_tokens=12, **GREEDY)))
        stop_at = tokens[5]
        cut, _, _, fin = collect(sched.submit([9, 8, 7], SamplingParams(max_tokens=12, stop_token_ids=(stop_at,), **GREEDY)))
        assert cut == tokens[: tokens.index(stop_at) + 1] and fin.reason == "stop"
    finally:
        sched.stop()
    eos_sched = Scheduler(tiny.engine, tiny.slots, eos_token_ids=(stop_at,))
    eos_sched.start()
    try:
        cut, _, _, fin = collect(eos_sched.submit([9, 8, 7], SamplingParams(max_tokens=12, temperature=0.0)))
        assert cut[-1] == stop_at and fin.reason == "stop"
        full, _, _, fin = collect(eos_sched.submit([9, 8, 7], SamplingParams(max_tokens=12, **GREEDY)))
        assert full == tokens and fin.reason == "length"  # ignore_eos
    finally:
        eos_sched.stop()


def test_sampling_semantics(tiny):
    sched = tiny.scheduler()
    p = [3, 14, 15, 92, 65]
    try:
        def run(**kw):
            return collect(sched.submit(p, SamplingParams(max_tokens=16, ignore_eos=True, **kw)))[0]

        greedy = run(temperature=0.0)
        assert run(temperature=1.0, top_k=1, seed=5) == greedy
        assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy
        assert run(temperature=1.3, seed=7) == run(temperature=1.3, seed=7)
        assert run(temperature=1.3, seed=7) != run(temperature=1.3, seed=8)
        h = sched.submit(p, SamplingParams(max_tokens=3, temperature=1.0))
        assert collect(h)[3].seed == h.seed  # the server picked a seed and reports it
        tokens, logprobs, tops, _ = collect(sched.submit(p, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)))
        for tok, lp, top in zip(tokens, logprobs, tops):
            assert len(top) == 3 and top[0][0] == tok and top[0][1] == lp  # greedy takes the best alternative
            assert top[0][1] >= top[1][1] >= top[2][1]
    finally:
        sched.stop()


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"),
    (dict(logprobs=6), "logprobs"), (dict(max_tokens="8"), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
])
def test_invalid_sampling_parameters_are_named(tiny, kwargs, param):
    sched = tiny.scheduler(start=False)
    with pytest.raises(InvalidRequest, match=f"invalid {param}") as e:
        sched.submit([1, 2, 3], SamplingParams(**kwargs))
    assert e.value.param == param


def test_limits_refuse_at_once_and_the_engine_keeps_serving(tiny):
    sched = tiny.scheduler(start=False)
    with pytest.raises(InvalidRequest, match=r"prompt \(40 tokens\) \+ max_tokens \(30\) = 70 exceeds this model's max_seq_len of 64"):
        sched.submit([1] * 40, SamplingParams(max_tokens=30))
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        sched.submit([], SamplingParams())
    with pytest.raises(InvalidRequest, match=r"token ids must be in \[0, 211\)"):
        sched.submit([5, 999], SamplingParams())
    small = Scheduler(tiny.engine, tiny.slots)  # not started: nothing leaves the queue
    queued = []
    with pytest.raises(Overloaded, match="at capacity"):
        for _ in range(tiny.engine.config.max_queue + tiny.engine.config.max_batch_size + 1):
            queued.append(small.submit([1, 2], SamplingParams(max_tokens=2, **GREEDY)))
    assert len(queued) == tiny.engine.config.max_queue + tiny.engine.config.max_batch_size  # free rows take some at once
    small.start()
    try:
        assert all(collect(h)[3].reason == "length" for h in queued)
        assert len(collect(small.submit([1, 2], SamplingParams(max_tokens=5, **GREEDY)))[0]) == 5
    finally:
        small.stop()


def test_adapter_loading_does_not_stall_running_rows(tiny):
    gate = threading.Event()
    loader = tiny.slots._loader

    def slow_loader(resolved):
        gate.wait(timeout=30)
        return loader(resolved)

    tiny.slots._loader = slow_loader
    fresh = tiny.store.publish("alice", "slow", lambda d: [(d / f.name).write_bytes(f.read_bytes())
                                                           for f in tiny.peft_dirs["a_qv_r4"].iterdir()])
    sched = tiny.scheduler()
    try:
        waiting = sched.submit([4, 5, 6], SamplingParams(max_tokens=5, **GREEDY), fresh)
        running = sched.submit([7, 8, 9], SamplingParams(max_tokens=40, **GREEDY))
        tokens, _, _, fin = collect(running)  # finishes while the adapter is still being read
        assert len(tokens) == 40 and fin.reason == "length" and not gate.is_set()
        gate.set()
        assert collect(waiting)[3].reason == "length"
    finally:
        tiny.slots._loader = loader
        sched.stop()


def test_failed_adapter_fails_only_its_requests(tiny):
    def write_broken(d):
        (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
        (d / "adapter_model.safetensors").write_bytes(b"garbage")

    broken = tiny.store.publish("alice", "broken", write_broken)
    sched = tiny.scheduler()
    try:
        bad = sched.submit([1, 2, 3], SamplingParams(max_tokens=3), broken)
        good = sched.submit([1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
        fin = collect(bad)[3]
        assert fin.reason == "error" and "truncated or corrupt" in str(fin.error)
        assert collect(good)[3].reason == "length" and sched.healthy
    finally:
        sched.stop()
