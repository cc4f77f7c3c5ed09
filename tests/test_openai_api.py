"""The OpenAI shapes without Ray: each endpoint's formatter against hand-written objects (stream chunks,
whole answers, usage, the adapter fields, both logprobs formats), the wire's failure message back
to the API error it was, and request validation edge cases that tests/test_serve.py does not send
over HTTP."""

from __future__ import annotations

import pickle
import re
import time

import pytest
from pydantic import ValidationError

from jaxlora.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_SEED, MAX_TOP_K, SamplingParams
from jaxlora.errors import InvalidRequest
from serve_app.errors import ApiError
from serve_app.openai_api import (ChatCompletionRequest, ChatFormat, Choice, CompletionFormat, CompletionRequest,
                                  TokenLogprob, usage_dict)
from serve_app.wire import AdapterVersion, Failed

ADAPTER = AdapterVersion("faq", "v0002")
USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
# Two tokens: " hi" (with two alternatives) and "é" (two UTF-8 bytes), three characters into the text.
TOKENS = [TokenLogprob(" hi", -0.5, ((" hi", -0.5), (" yo", -1.25)), 0), TokenLogprob("é", -2.0, (("é", -2.0),), 3)]


def _head(fmt, object_: str, fingerprint: str, adapter: dict | None) -> dict:
    return {"id": fmt.id, "object": object_, "created": fmt.created, "model": "m", "adapter": adapter,
            "system_fingerprint": fingerprint}


def test_usage_counts_both_sides():
    assert usage_dict(4, 2) == USAGE


@pytest.mark.parametrize("cls, prefix", [(CompletionFormat, "cmpl-"), (ChatFormat, "chatcmpl-")])
def test_a_response_has_one_id_and_creation_time(cls, prefix):
    fmt = cls("m", None, "base")
    assert re.fullmatch(re.escape(prefix) + "[0-9a-f]{24}", fmt.id)
    assert abs(fmt.created - time.time()) < 5
    assert cls("m", None, "base").id != fmt.id
    chunks = [fmt.chunk(0, "a", None, None), fmt.chunk(0, "", None, "stop"), fmt.usage_chunk(USAGE)]
    assert {(c["id"], c["created"]) for c in chunks} == {(fmt.id, fmt.created)}


def test_completion_chunks_and_answer():
    fmt = CompletionFormat("m", None, "base")
    head = _head(fmt, "text_completion", "base", None)
    assert fmt.first_chunk(0) is None
    assert fmt.chunk(0, "Hel", None, None) == head | {
        "choices": [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}]}
    assert fmt.chunk(3, "lo", None, "length", USAGE) == head | {
        "choices": [{"index": 3, "text": "lo", "logprobs": None, "finish_reason": "length"}], "usage": USAGE}
    assert fmt.final([Choice(0, "Hello", None, "length"), Choice(1, "Hi", None, "stop")], USAGE) == head | {
        "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"},
                    {"index": 1, "text": "Hi", "logprobs": None, "finish_reason": "stop"}], "usage": USAGE}
    assert fmt.usage_chunk(USAGE) == head | {"choices": [], "usage": USAGE}


def test_chat_chunks_and_answer():
    fmt = ChatFormat("m", None, "base")
    head = _head(fmt, "chat.completion.chunk", "base", None)
    assert fmt.first_chunk(1) == head | {
        "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
    assert fmt.chunk(0, "Hi", None, None) == head | {
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}]}
    assert fmt.chunk(0, "", None, "stop", USAGE) == head | {  # no text: an empty delta
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], "usage": USAGE}
    assert fmt.final([Choice(0, "Hi", None, "stop"), Choice(1, "Yo", None, "length")], USAGE) == _head(
        fmt, "chat.completion", "base", None) | {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "logprobs": None, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "Yo"}, "logprobs": None,
                     "finish_reason": "length"}], "usage": USAGE}
    assert fmt.usage_chunk(USAGE) == head | {"choices": [], "usage": USAGE}


@pytest.mark.parametrize("cls", [CompletionFormat, ChatFormat])
def test_an_adapter_is_named_with_its_version(cls):
    served = cls("faq", ADAPTER, "base").final([Choice(0, "x", None, "stop")], USAGE)
    assert served["adapter"] == {"id": "faq", "version": "v0002"} and served["system_fingerprint"] == "faq@v0002"
    base = cls("base", None, "base").final([Choice(0, "x", None, "stop")], USAGE)
    assert base["adapter"] is None and base["system_fingerprint"] == "base"


def test_completion_logprobs_are_columns_with_text_offsets():
    fmt = CompletionFormat("m", None, "base")
    want = {"tokens": [" hi", "é"], "token_logprobs": [-0.5, -2.0], "top_logprobs": [{" hi": -0.5, " yo": -1.25}, {"é": -2.0}],
            "text_offset": [0, 3]}
    assert fmt.final([Choice(0, " hié", TOKENS, "length")], USAGE)["choices"][0]["logprobs"] == want
    assert fmt.chunk(0, "é", TOKENS[1:], None)["choices"][0]["logprobs"] == {
        "tokens": ["é"], "token_logprobs": [-2.0], "top_logprobs": [{"é": -2.0}], "text_offset": [3]}
    assert fmt.final([Choice(0, "", [], "length")], USAGE)["choices"][0]["logprobs"] == {  # asked for, none generated
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def test_completion_top_logprobs_hold_the_token_itself_and_an_echoed_prompts_first_has_none():
    """OpenAI: up to logprobs + 1 entries, the chosen token always among them; an echoed prompt's first
    token has no logprob and no alternatives (null in both columns)."""
    fmt = CompletionFormat("m", None, "base")
    tokens = [TokenLogprob("Hi", None, None, 0), TokenLogprob(" there", -3.0, ((" you", -0.25),), 2)]
    assert fmt.chunk(0, "Hi there", tokens, None)["choices"][0]["logprobs"] == {
        "tokens": ["Hi", " there"], "token_logprobs": [None, -3.0], "top_logprobs": [None, {" you": -0.25, " there": -3.0}],
        "text_offset": [0, 2]}


def test_chat_logprobs_are_entries_with_utf8_bytes():
    fmt = ChatFormat("m", None, "base")
    hi = {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105], "top_logprobs": [
        {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105]}, {"token": " yo", "logprob": -1.25, "bytes": [32, 121, 111]}]}
    e = {"token": "é", "logprob": -2.0, "bytes": [195, 169], "top_logprobs": [{"token": "é", "logprob": -2.0, "bytes": [195, 169]}]}
    assert fmt.final([Choice(0, " hié", TOKENS, "length")], USAGE)["choices"][0]["logprobs"] == {"content": [hi, e]}
    assert fmt.chunk(0, "é", TOKENS[1:], None)["choices"][0]["logprobs"] == {"content": [e]}


def test_a_failure_on_the_wire_is_the_api_error_it_was():
    e = ApiError(404, "adapter 'x' does not exist", "invalid_request_error", "model", "model_not_found")
    back = pickle.loads(pickle.dumps(Failed.of(e))).error()  # as Ray carries it between the replicas
    assert (back.status, back.body()) == (404, e.body())


# -- request validation: edge cases not sent over HTTP in tests/test_serve.py ----------------------------

def _completion(**fields) -> CompletionRequest:
    return CompletionRequest(**({"model": "m", "prompt": "x"} | fields))


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(**({"model": "m", "messages": [{"role": "user", "content": "x"}]} | fields))


def test_the_engine_gets_what_the_request_asked_and_decides_what_it_left_open():
    assert _chat().sampling_params() == SamplingParams(max_tokens=None)  # the engine gives the rest of the context
    assert _chat(max_tokens=7).sampling_params().max_tokens == 7
    assert _chat(max_tokens=7, max_completion_tokens=3).sampling_params().max_tokens == 3  # the newer name wins
    assert _completion().sampling_params() == SamplingParams(max_tokens=16)  # OpenAI's default for completions
    assert _completion(top_k=-1).sampling_params().top_k == 0  # vLLM's "off" is the engine's 0
    asked = _completion(max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=9, ignore_eos=True, logprobs=2,
                        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.5, min_p=0.1,
                        logit_bias={"7": 2})
    assert asked.sampling_params() == SamplingParams(
        max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=9, ignore_eos=True, logprobs=2, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.5, min_p=0.1, logit_bias=((7, 2.0),))


@pytest.mark.parametrize("fields, count", [({}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3),
                                           ({"top_logprobs": 3}, None)])
def test_chat_logprobs_are_asked_for_with_a_flag(fields, count):
    assert _chat(**fields).sampling_params().logprobs == count


def test_logit_bias_becomes_sorted_integer_pairs():
    assert _completion(logit_bias={"10": 1, "2": -5.5}).logit_bias_pairs() == ((2, -5.5), (10, 1.0))
    assert _completion().logit_bias_pairs() == ()
    _completion(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS)})
    with pytest.raises(ValidationError, match="logit_bias"):
        _completion(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)})


def test_stop_is_one_string_or_a_short_list():
    assert _completion().stop_strings() == []
    assert _completion(stop="\n").stop_strings() == ["\n"]
    assert _completion(stop=["a", "b"]).stop_strings() == ["a", "b"]
    with pytest.raises(ValidationError, match="stop"):
        _completion(stop=[str(i) for i in range(9)])
    with pytest.raises(ValidationError, match="stop"):
        _completion(stop="x" * 1001)


def test_message_content_as_text_parts():
    parts = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": None}])
    assert [m.text() for m in parts.messages] == ["ab", ""]
    with pytest.raises(ValidationError, match="type"):
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])


def _refused_at(build, fields: dict) -> str:
    """Where the first validation error is (what the ingress's 400 names)."""
    with pytest.raises(ValidationError) as e:
        build(**fields)
    return ".".join(str(p) for p in e.value.errors()[0]["loc"])


@pytest.mark.parametrize("fields, where", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls.0.function"),  # a call in the history needs its function
    ({"top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stream": 1}, "stream"),  # strict: 1 is not a bool
    ({"stream_options": {"include_usage": True, "chunk_size": 4}}, "stream_options.chunk_size"),
])
def test_chat_requests_refused(fields, where):
    assert _refused_at(_chat, fields) == where


@pytest.mark.parametrize("fields, where", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),  # every prompt of a batch has a token
    ({"prompt": ["a", [1]]}, "prompt"),  # a batch is texts or token lists, not both
    ({"max_tokens": "8"}, "max_tokens"),  # strict: a string is not a number
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"top_k": MAX_TOP_K + 1}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"model": ""}, "model"),
])
def test_completion_requests_refused(fields, where):
    assert _refused_at(_completion, fields).split(".")[0] == where


def test_edge_values_accepted():
    assert _completion(seed=MAX_SEED, top_k=MAX_TOP_K, prompt=["one string"]).seed == MAX_SEED
    assert _completion(prompt=[0, 5]).prompt == [0, 5]


@pytest.mark.parametrize("prompt, prompts", [("a", ["a"]), ([5, 6], [[5, 6]]), (["a", "b"], ["a", "b"]),
                                             ([[1], [2, 3]], [[1], [2, 3]])])
def test_a_completion_prompt_is_one_prompt_or_a_batch(prompt, prompts):
    assert _completion(prompt=prompt).prompts() == prompts


def test_echo_asks_for_the_prompt_logprobs_and_max_tokens_0_only_with_echo():
    assert _completion(echo=True, logprobs=2).sampling_params().prompt_logprobs == 2
    assert _completion(echo=True).sampling_params().prompt_logprobs is None  # echo without logprobs: text only
    assert _completion(logprobs=2).sampling_params().prompt_logprobs is None
    alone = _completion(echo=True, max_tokens=0, n=3)
    assert alone.prompt_only() and alone.sampling_params().max_tokens == 1 and alone.sampling_params().n == 3
    with pytest.raises(InvalidRequest, match="max_tokens: 0 returns nothing without echo") as e:
        _completion(max_tokens=0).check()
    assert e.value.param == "max_tokens"
