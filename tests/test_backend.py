"""LocalJaxLoRABackend end to end on the demo model: text in, text out, adapters from a real store."""

from __future__ import annotations

import time

import pytest

from jaxlora import kernels
from jaxlora.adapter_format import write_peft
from jaxlora.tiny_model import random_adapter
from jaxlora.sampling import SamplingParams
from jaxlora.backend import LocalJaxLoRABackend
from jaxlora.engine import EngineConfig
from jaxlora.errors import AdapterNotFoundError
from jaxlora.tokenizer import TextStream, load_tokenizer


@pytest.fixture(scope="module")
def backend(demo_model_dir, tmp_path_factory):
    b = LocalJaxLoRABackend(demo_model_dir, tmp_path_factory.mktemp("fs"),
                            EngineConfig(max_batch_size=4, max_seq_len=128, prefill_chunk=16, num_adapter_slots=3))
    ad = random_adapter(b.model_config, r=8, alpha=16, seed=1, std=0.3)
    b.store.publish("local", "faq", lambda d: write_peft(ad, d), base_model={"name": b.model_id, "fingerprint": b.replica.fingerprint})
    yield b
    b.close()


def test_generate_reports_text_and_usage(backend):
    out = backend.generate(prompt="What does the adapter do?", max_tokens=12, temperature=0.0, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert out.text == backend.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens, u.model, u.adapter, u.adapter_version) == (
        len(backend.encode("What does the adapter do?")), 12, backend.model_id, None, None)
    assert u.latency_ms >= u.ttft_ms > 0


def test_the_tenant_and_its_weight_reach_the_scheduler(backend):
    before = backend.scheduler.counters.counters.get("gold", 0.0)
    handle = backend.submit(backend.encode("hi"), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                            user="gold", weight=2.0)
    assert (handle.request.tenant, handle.request.weight) == ("gold", 2.0)
    assert list(handle)[-1].completion_tokens == 3
    # the tenant's service: its prompt and 3 completion tokens (weight 2 each), halved by its weight
    expected = (len(backend.encode("hi")) + 2.0 * 3) / 2.0
    assert backend.scheduler.counters.counters["gold"] == before + expected


def test_adapter_version_is_reported_and_changes_output(backend):
    base = backend.generate(prompt="Hello", max_tokens=10, temperature=0.0, ignore_eos=True)
    tuned = backend.generate(prompt="Hello", adapter="faq", max_tokens=10, temperature=0.0, ignore_eos=True)
    assert (tuned.usage.adapter, tuned.usage.adapter_version) == ("faq", "v0001")
    assert tuned.token_ids != base.token_ids
    pinned = backend.generate(prompt="Hello", adapter="faq@v0001", max_tokens=10, temperature=0.0, ignore_eos=True)
    assert pinned.token_ids == tuned.token_ids
    assert backend.generate(prompt="Hello", adapter=backend.model_id, max_tokens=10, temperature=0.0,
                            ignore_eos=True).token_ids == base.token_ids
    with pytest.raises(AdapterNotFoundError):
        backend.generate(prompt="Hello", adapter="nope")


def test_stream_equals_generate_and_ends_with_usage(backend):
    kw = dict(prompt="Tell me about JAX", max_tokens=16, temperature=0.8, seed=42, ignore_eos=True)
    chunks = list(backend.stream(**kw))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].seed == 42
    assert "".join(c.text for c in chunks) == backend.generate(**kw).text


def test_stop_string_truncates_and_finishes(backend):
    full = backend.generate(prompt="Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True)
    stop = full.text[8:11]
    assert len(stop) == 3  # the greedy text is long enough to take a stop string from
    out = backend.generate(prompt="Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.index(stop)]
    assert backend.scheduler.free_rows() == 4


def test_chat_messages_use_the_template(backend):
    messages = [{"role": "user", "content": "hi"}]
    out = backend.generate(messages=messages, max_tokens=3, temperature=0.0)
    assert out.usage.prompt_tokens == len(backend.tokenizer("<|bos|><|start|>user\nhi<|end|>\n<|start|>assistant\n",
                                                            add_special_tokens=False)["input_ids"])


def test_closing_a_stream_early_frees_the_row(backend):
    cancelled = backend.metrics()["requests_cancelled"]
    stream = backend.stream(prompt="Hi", max_tokens=100, temperature=0.0, ignore_eos=True)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while backend.scheduler.free_rows() != 4:
        assert time.monotonic() < deadline, "the row of the closed stream was not freed"
        time.sleep(0.01)
    assert backend.metrics()["requests_cancelled"] == cancelled + 1


def test_metrics_cover_the_engine(backend):
    backend.generate(prompt="Hello", adapter="faq", max_tokens=3, temperature=0.0)  # an adapter load, even run alone
    m = backend.metrics()
    for key in ("decode_tokens_per_s", "batch_occupancy", "queue_depth", "ttft_s", "tpot_s", "compilations", "memory"):
        assert key in m
    assert m["adapter_cache"]["loads"] >= 1 and m["memory"]["host_peak_rss_bytes"] > 0
    assert m["decode_kernels"] is kernels.available()  # the float32 demo model takes them wherever they are built
    assert backend.healthy


def test_text_stream_holds_back_partial_stop_strings(demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok, stop=["STOP", "never"])
    pieces = [ts.add(i) for i in ids]
    assert "".join(pieces) == "alpha beta " and ts.stopped
    ts2 = TextStream(tok, stop=["gamma delta"])
    text = "".join(ts2.add(i) for i in ids) + ts2.finish()
    assert text == "alpha beta STOP gamma" and not ts2.stopped
