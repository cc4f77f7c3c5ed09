"""The serving app on real Ray Serve (localhost), driven over HTTP by the official `openai` client
and by httpx: API shapes, tenants, errors, back-pressure, disconnects and hot reload."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from jaxlora.adapter_format import write_peft  # noqa: E402
from jaxlora.tiny_model import random_adapter  # noqa: E402
from jaxlora.adapter_store import AdapterStore  # noqa: E402
from jaxlora.hf_checkpoint import model_fingerprint  # noqa: E402
from jaxlora.config import ModelConfig  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.keys import add_key, remove_keys  # noqa: E402
from serve_app.placement import adapter_key, rendezvous_order  # noqa: E402
from tests.json_schemas import PERSON  # noqa: E402

ENGINE = {"max_batch_size": 8, "max_seq_len": 512, "prefill_chunk": 16, "decode_steps": 4, "max_queue": 64,
          "num_adapter_slots": 4, "max_lora_rank": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, store: AdapterStore, model_dir, keys: dict[str, str]):
        self.url, self.store, self.model_dir, self.keys = url, store, model_dir, keys
        self.cfg = ModelConfig.from_dir(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.base = model_dir.name

    def publish(self, user, adapter_id, seed):
        ad = random_adapter(self.cfg, r=8, alpha=16, seed=seed, std=0.5)
        return self.store.publish(user, adapter_id, lambda d: write_peft(ad, d),
                                  base_model={"name": self.base, "fingerprint": self.fingerprint})

    def client(self, user="alice", prefix="") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}{prefix}/v1", api_key=self.keys.get(user, "none"), max_retries=0, timeout=120)

    def aclient(self, user="alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[user], max_retries=0, timeout=120)

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"prompt": text}).json()["tokens"]

    def detokenize(self, ids: list[int]) -> str:
        return self.post("/detokenize", {"tokens": ids}).json()["prompt"]

    def post(self, path, body, user="alice", **kw):
        headers = {"Authorization": f"Bearer {self.keys[user]}"} if user else {}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=120, **kw)


@pytest.fixture(scope="module")
def server(ray_local, demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    keys_file = root / "keys.json"
    keys = {u: add_key(keys_file, u) for u in ("alice", "bob")}
    # Rate-limit tiers, each for tenants only the rate-limit tests use: alice and bob have no limits.
    data = json.loads(keys_file.read_text())
    data["tiers"] = {"rpm3": {"requests_per_minute": 3}, "tpm100": {"tokens_per_minute": 100},
                     "roomy": {"requests_per_minute": 100, "tokens_per_minute": 10_000}, "rpm4": {"requests_per_minute": 4}}
    keys_file.write_text(json.dumps(data))
    keys |= {u: add_key(keys_file, u, tier) for u, tier in (("dora", "rpm3"), ("erin", "tpm100"), ("gus", "roomy"),
                                                              ("fay", "rpm4"))}
    store = AdapterStore(root / "fs")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    srv = Server(f"http://127.0.0.1:{port}", store, demo_model_dir, keys)
    srv.keys_file = keys_file
    for i in range(4):
        srv.publish("alice", f"a{i}", seed=i)
    srv.publish("bob", "secret", seed=10)
    srv.publish(None, "common", seed=11)
    # Replicas reserve no CPU here: several apps share the 2 CPUs of the test's Ray.
    common = {"model_dir": str(demo_model_dir), "fs_root": str(root / "fs"), "poll_interval_s": 0.25, "model_num_cpus": 0}
    srv.common = common  # for tests that start an app of their own
    # rate_limit_timeout_s: on this shared 2-CPU box a check may be slow; failing open has its own test.
    limited = {"auth": True, "api_keys_file": str(keys_file), "rate_limit_timeout_s": 10}
    serve.run(build_app({**common, **limited, "engine": ENGINE, "max_request_bytes": 65536}), name="main", route_prefix="/")
    # Two model replicas, to see each adapter's requests go to its home replica. Main's engine: they load
    # the programs main compiled (jaxlora.compile_cache). It streams 6 tokens at a time after the first.
    serve.run(build_app({**common, "engine": ENGINE, "model_replicas": 2, "stream_interval": 6}),
              name="pair", route_prefix="/pair")
    # A deliberately tiny deployment for back-pressure: one row, no engine queue, two queued at the handle.
    # Its streams are paced to one message in 1000 s (stream_messages_per_s): after the first token only
    # the end of a request is sent. One prefill bucket keeps its start (compilation) short.
    serve.run(build_app({**common, "engine": {**ENGINE, "max_batch_size": 1, "max_queue": 0, "max_seq_len": 128,
                                              "prefill_chunk": 128},
                         "model_max_queued_requests": 2, "stream_messages_per_s": 0.001}), name="bp", route_prefix="/bp")
    # Two ingress replicas, to see they share one rate limit (TenantState). An app of its own: the metrics
    # test of "main" counts on its one ingress replica having exported everything before its marker. One
    # prefill bucket keeps its start (compilation) short.
    serve.run(build_app({**common, **limited, "engine": {**ENGINE, "max_batch_size": 2, "max_seq_len": 32,
                                                         "prefill_chunk": 32}, "ingress_replicas": 2}),
              name="twin", route_prefix="/twin")
    yield srv
    serve.shutdown()


def test_keys_added_and_revoked_in_the_file_take_effect_without_a_restart(server):
    """The ingress re-reads the keys file when it changes: a new tenant's key works on its next
    request, a revoked one gets 401 on its next request, and a broken file changes nothing."""
    carol = add_key(server.keys_file, "carol")
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {carol}"}, timeout=60)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == server.base
    remove_keys(server.keys_file, "carol")
    revoked = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {carol}"}, timeout=60)
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "invalid_api_key"
    good = server.keys_file.read_text()
    server.keys_file.with_name("broken.json").write_text('{"keys": [')
    server.keys_file.with_name("broken.json").replace(server.keys_file)
    try:
        assert server.client().models.list().data  # alice's key still works
    finally:
        server.keys_file.with_name("good.json").write_text(good)
        server.keys_file.with_name("good.json").replace(server.keys_file)


def test_usage_is_each_tenants_own_and_sums_the_responses(server):
    def usage(user):
        r = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {server.keys[user]}"}, timeout=60)
        assert r.status_code == 200
        return r.json()

    alice_before, bob_before = usage("alice"), usage("bob")
    client = server.client("alice")
    got = [client.completions.create(model="a1", prompt="count me", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).usage,
           client.chat.completions.create(model=server.base, messages=[{"role": "user", "content": "and me"}],
                                          max_tokens=3, temperature=0, extra_body={"ignore_eos": True}).usage]
    chunks = list(client.completions.create(model="a1", prompt="me too", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    got.append(chunks[-1].usage)
    want = {"requests": alice_before["requests"] + 3,
            "prompt_tokens": alice_before["prompt_tokens"] + sum(u.prompt_tokens for u in got),
            "completion_tokens": alice_before["completion_tokens"] + sum(u.completion_tokens for u in got)}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the ingress records without waiting for the ledger
        now = usage("alice")
        if {k: now[k] for k in want} == want:
            break
        time.sleep(0.1)
    assert {k: now[k] for k in want} == want and now["tenant"] == "alice"
    a1 = next(m for m in now["by_model"] if m["model"] == "a1")
    a1_before = next((m for m in alice_before["by_model"] if m["model"] == "a1"), {"requests": 0})
    assert a1["requests"] == a1_before["requests"] + 2
    assert usage("bob") == bob_before  # another tenant's requests are never in it


def test_a_flooding_key_does_not_make_another_key_wait_for_its_backlog(server):
    """Alice holds every row of `main` (8) and queues 8 more requests of 500 tokens; bob then asks
    for 4 tokens. Fair scheduling with preemption gives bob a row within a decode call or two (a
    row of alice's goes to host memory and comes back later), so bob's answer is complete before
    any of alice's requests has finished, let alone started her backlog. Under arrival order bob
    would wait for both of alice's waves; without preemption, for her first requests to end.
    An ordering, with a margin: alice's requests each need 125 decode calls, bob's one or two once
    it reached the replica. His way there, past an ingress busy streaming alice's tokens, took
    10 decode calls on a quiet machine (stats' decode_calls) and over 30 under the full suite once,
    when alice's requests needed 30: so they are as long as `main`'s context allows."""
    n_flood, flood_tokens = 16, 500
    alice, bob = ({"Authorization": f"Bearer {server.keys[u]}"} for u in ("alice", "bob"))

    async def main():
        accepted, done, first_token = [], [], set()
        all_accepted = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def flood(i):
                body = {"model": server.base, "prompt": f"flood {i}", "max_tokens": flood_tokens, "ignore_eos": True,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
                async with http.stream("POST", "/v1/completions", json=body, headers=alice) as r:
                    assert r.status_code == 200  # headers come once a replica accepted (queued) the request
                    accepted.append(i)
                    if len(accepted) == n_flood:
                        all_accepted.set()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                usage = chunk["usage"]["completion_tokens"]
                            elif chunk["choices"] and chunk["choices"][0]["text"]:
                                first_token.add(i)
                done.append(i)
                return usage

            tasks = [asyncio.create_task(flood(i)) for i in range(n_flood)]
            await asyncio.wait_for(all_accepted.wait(), 120)
            light = await http.post("/v1/completions", headers=bob, json={
                "model": server.base, "prompt": "just me", "max_tokens": 4, "ignore_eos": True, "temperature": 0.0})
            seen = (len(done), len(first_token))
            return light, seen, await asyncio.gather(*tasks)

    light, (flood_done, flood_started), flood_usage = asyncio.run(main())
    assert light.status_code == 200 and light.json()["usage"]["completion_tokens"] == 4
    assert flood_done == 0, f"{flood_done} of alice's requests ended before bob's 4 tokens"
    assert flood_started <= 9, f"alice's backlog had started: {flood_started} of her requests had tokens"
    assert flood_usage == [flood_tokens] * n_flood  # the preempted ones resumed and finished
    assert httpx.get(f"{server.url}/v1/usage", timeout=60).status_code == 401


RESET = r"(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)"  # OpenAI's reset durations: "20ms", "1s", "17.28s", "6m0s"


def _limit_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


def test_a_tenant_over_its_requests_per_minute_gets_429_with_headers_while_others_are_served(server):
    """dora's tier allows 3 requests a minute: the 4th (on either route) is a 429 in OpenAI's shape with
    Retry-After and the x-ratelimit-* headers, while bob, who has no limits, is served as before."""
    body = {"model": server.base, "prompt": "x", "max_tokens": 2}
    served = [server.post("/v1/completions", body, user="dora") for _ in range(3)]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in served] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in served)
    assert all(re.fullmatch(RESET, r.headers["x-ratelimit-reset-requests"]) for r in served)
    assert "x-ratelimit-limit-tokens" not in served[0].headers  # dora has no token limit
    refused = server.post("/v1/completions", body, user="dora")
    assert refused.status_code == 429, refused.text
    err = refused.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("requests", "rate_limit_exceeded", None)
    assert err["message"].startswith("Rate limit reached for requests per min (RPM): Limit 3. Please try again in ")
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request comes back every 20 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(RESET, refused.headers["x-ratelimit-reset-requests"])
    with pytest.raises(openai.RateLimitError) as chat:  # the other route draws on the same budget
        server.client("dora").chat.completions.create(model=server.base, messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=2)
    assert chat.value.response.headers["x-ratelimit-limit-requests"] == "3" and chat.value.code == "rate_limit_exceeded"
    other = server.post("/v1/completions", body, user="bob")
    assert other.status_code == 200 and not _limit_headers(other)


def test_the_token_limit_counts_the_reserved_max_tokens_and_gives_back_what_was_not_used(server):
    """erin's tier allows 100 tokens a minute (1.67 a second). A request reserves prompt + max_tokens at
    admission; one the engine then refuses gives it all back; a reservation over the whole limit can
    never be admitted and says what to lower."""
    ids = [5, 6, 7, 8]  # exactly 4 prompt tokens
    missing = server.post("/v1/completions", {"model": "no-such-adapter", "prompt": ids, "max_tokens": 30}, user="erin")
    assert missing.status_code == 404 and missing.headers["x-ratelimit-remaining-tokens"] == "66"  # 100 - (4 + 30)
    started = time.monotonic()
    first = server.post("/v1/completions", {"model": server.base, "prompt": ids, "max_tokens": 60, "ignore_eos": True},
                        user="erin")
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 60
    # Reserved 64 of a full bucket: the 404's 34 came back, else 2 would be left.
    assert 36 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 40
    assert first.headers["x-ratelimit-limit-tokens"] == "100" and "x-ratelimit-limit-requests" not in first.headers
    second = server.post("/v1/completions", {"model": server.base, "prompt": ids, "max_tokens": 92}, user="erin")
    assert second.status_code == 429, second.text
    err = second.json()["error"]
    assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded")
    assert "tokens per min (TPM): Limit 100" in err["message"] and "Requested 96 (prompt 4 + max_tokens 92)" in err["message"]
    waited = time.monotonic() - started
    assert 36 - waited - 1 <= int(second.headers["retry-after"]) <= 37  # 60 tokens short at 100 a minute
    too_large = server.post("/v1/completions", {"model": server.base, "prompt": ids, "max_tokens": 97}, user="erin")
    assert too_large.status_code == 429 and "retry-after" not in too_large.headers
    assert too_large.json()["error"]["type"] == "tokens"
    assert "can never fit" in too_large.json()["error"]["message"] and "lower max_tokens" in too_large.json()["error"]["message"]
    # Without max_tokens the engine fills the context (max_seq_len), and that is what is reserved.
    no_max = server.post("/v1/chat/completions", {"model": server.base, "messages": [{"role": "user", "content": "x"}]},
                         user="erin")
    assert no_max.status_code == 429 and "max_tokens " in no_max.json()["error"]["message"]
    reserved = rf"Requested {ENGINE['max_seq_len']} \(prompt (\d+) \+ max_tokens (\d+)\)"
    assert re.search(reserved, no_max.json()["error"]["message"])


def test_rate_limit_headers_are_on_streaming_responses(server):
    gus = {"Authorization": f"Bearer {server.keys['gus']}"}
    start = time.monotonic()
    for route, body in (("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 5}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5})):
        body = {"model": server.base, "stream": True, "ignore_eos": True, **body}
        with httpx.stream("POST", f"{server.url}{route}", json=body, headers=gus, timeout=120) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "data: [DONE]"
        limits = _limit_headers(r)
        assert set(limits) == {f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
                               for kind in ("requests", "tokens")}
        assert limits["x-ratelimit-limit-requests"] == "100" and limits["x-ratelimit-limit-tokens"] == "10000"
        assert int(limits["x-ratelimit-remaining-tokens"]) <= 10_000 - 5 - 3
    raw = server.client("gus").completions.with_raw_response.create(model=server.base, prompt="x", max_tokens=2, stream=True)
    refilled = int((time.monotonic() - start) * 100 / 60) + 1  # the bucket refills at 100 a minute meanwhile
    assert int(raw.headers["x-ratelimit-remaining-requests"]) <= 97 + refilled
    list(raw.parse())


def test_limits_hold_across_two_ingress_replicas(server):
    """fay may make 4 requests a minute (one more every 15 s). Requests over the twin app's two ingress
    replicas, in concurrent waves until both replicas have answered: exactly 4 of them are served."""
    body = {"model": server.base, "prompt": "x", "max_tokens": 1}
    codes, answered_by = [], collections.Counter()
    deadline = time.monotonic() + 10
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while len(answered_by) < 2 or len(codes) < 12:
            assert time.monotonic() < deadline, (codes, answered_by)
            for r in pool.map(lambda _: server.post("/twin/v1/completions", body, user="fay"), range(6)):
                codes.append(r.status_code)
                answered_by[r.headers["x-jaxlora-ingress"]] += 1
    assert codes.count(200) == 4 and codes.count(429) == len(codes) - 4, codes
    assert len(answered_by) == 2, answered_by


def test_openai_client_completions_and_chat(server):
    client = server.client()
    c = client.completions.create(model=server.base, prompt="Hello", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert isinstance(c, openai.types.Completion)
    assert c.usage.completion_tokens == 6 and c.choices[0].finish_reason == "length"
    assert c.system_fingerprint == server.base
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert isinstance(chat, openai.types.chat.ChatCompletion)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    assert chat.model_extra["adapter"] == {"id": "a1", "version": "v0001"}
    base_chat = client.chat.completions.create(model=server.base, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert base_chat.choices[0].message.content != chat.choices[0].message.content
    ids = client.completions.create(model="a2@v0001", prompt=[5, 6, 7, 8], max_tokens=3, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4 and ids.system_fingerprint == "a2@v0001"


def test_openai_client_streaming(server):
    client = server.client()
    chunks = list(client.chat.completions.create(
        model="a0", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10, temperature=0.7, seed=3,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "top_k": 20}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason == "length"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10,
                                           temperature=0.7, seed=3, extra_body={"ignore_eos": True, "top_k": 20})
    assert streamed == again.choices[0].message.content  # same seed, same text, streamed or not
    kw = {"model": server.base, "prompt": "Once", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    pieces = list(client.completions.create(stream=True, **kw))
    assert pieces[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in pieces) == client.completions.create(**kw).choices[0].text


def test_a_shared_prompt_prefix_comes_from_the_cache_and_usage_says_how_much(server):
    client = server.client()
    system = {"role": "system", "content": "Answer in one short sentence, politely, and never guess. " * 2}
    kw = dict(model="a1", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(messages=[system, {"role": "user", "content": "Who are you?"}], **kw)
    assert 48 < first.usage.prompt_tokens < ENGINE["max_seq_len"] - 6  # several chunks of 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(messages=[system, {"role": "user", "content": "And what now?"}], **kw)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % ENGINE["prefill_chunk"] == 0  # the system prompt's whole chunks
    chunks = list(client.chat.completions.create(messages=[system, {"role": "user", "content": "Who are you?"}],
                                                 stream=True, stream_options={"include_usage": True}, **kw))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16  # all but its last chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    # Cut by a stop string, which the ingress matches and which cancels the row before its Done: the
    # count still comes (it travels with the first tokens).
    text = first.choices[0].message.content
    assert len(text) >= 4, text
    stop = text[len(text) // 2:][:2]
    cut = client.chat.completions.create(messages=[system, {"role": "user", "content": "Who are you?"}], stop=[stop], **kw)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens_details.cached_tokens


def test_logprobs_and_stop_strings(server):
    client = server.client()
    c = client.completions.create(model=server.base, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs) == 4 and all(len(t) <= 3 for t in lp.top_logprobs)
    # OpenAI: the 2 alternatives asked for and the token itself
    assert all(top[token] == logprob for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    full = client.completions.create(model=server.base, prompt="Hello", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:6]
    cut = client.completions.create(model=server.base, prompt="Hello", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def _reference_logprobs(server, adapter: str | None, prompt: list[int]):
    """transformers' (and PEFT's, on an adapter) log-softmax [T, V] over `prompt`: row i is the
    distribution of token i + 1."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, server.store.resolve("alice", adapter).path)
    with torch.no_grad():
        return torch.log_softmax(model.eval()(torch.tensor([prompt])).logits[0], dim=-1).numpy()


@pytest.mark.parametrize("adapter", [None, "a2"])
def test_echo_returns_the_prompt_logprobs_transformers_computes_prefix_cache_or_not(server, adapter):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs, max_tokens 1): each
    prompt token after the first gets the logprob transformers (+ PEFT) gives it, its top alternatives
    and its text offset; the first gets null. Sent twice: after a plain request put the prompt's
    chunks in the prefix cache, the logprob request still computes every chunk (cached_tokens 0)."""
    import numpy as np

    model = adapter or server.base
    rng = np.random.default_rng(31 if adapter else 32)
    prompt = rng.integers(5, 200, size=40).tolist()  # chunks of 16: two complete ones
    plain = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1}).json()
    again = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32, (plain, again)
    r = server.post("/v1/completions", {"model": model, "prompt": [prompt], "max_tokens": 1, "echo": True,
                                        "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0 and usage["completion_tokens"] == 1
    lp = choice["logprobs"]
    texts = [server.detokenize([t]) for t in prompt]
    assert lp["tokens"][:40] == texts and choice["text"].startswith(server.detokenize(prompt))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:40] == list(np.cumsum([0] + [len(t) for t in texts[:-1]]))
    reference = _reference_logprobs(server, adapter, prompt)
    np.testing.assert_allclose(lp["token_logprobs"][1:40], reference[np.arange(39), prompt[1:]], atol=1e-4)
    for i in range(1, 40):  # the two best and the token itself
        want = {server.detokenize([int(t)]): float(reference[i - 1, t]) for t in np.argsort(-reference[i - 1])[:2]}
        want.setdefault(texts[i], float(reference[i - 1, prompt[i]]))  # two ids may share a text: the first stays
        assert lp["top_logprobs"][i].keys() == want.keys()
        np.testing.assert_allclose(list(lp["top_logprobs"][i].values()), list(want.values()), atol=1e-4)


def test_echo_with_max_tokens_0_returns_the_prompt_alone(server):
    text = "The quick brown fox"
    r = server.post("/v1/completions", {"model": server.base, "prompt": [text, "jumps"], "max_tokens": 0, "echo": True,
                                        "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == [text, "jumps"]
    assert body["usage"]["completion_tokens"] == 0 and all(c["finish_reason"] == "length" for c in body["choices"])
    ids = server.tokenize(text)
    assert body["choices"][0]["logprobs"]["tokens"] == [server.detokenize([t]) for t in ids]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(server.tokenize("jumps"))
    streamed = server.client().completions.create(model=server.base, prompt=text, max_tokens=3, echo=True, stream=True,
                                                  temperature=0, extra_body={"ignore_eos": True})
    whole = server.client().completions.create(model=server.base, prompt=text, max_tokens=3, echo=True, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text and whole.choices[0].text.startswith(text)


def test_a_batch_of_8_prompts_answers_8_choices_in_order_each_as_the_prompt_alone(server):
    prompts = [f"Prompt number {i}: " + "word " * i for i in range(8)]
    alone = [server.client().completions.create(model="a1", prompt=p, max_tokens=6, temperature=0,
                                                extra_body={"ignore_eos": True}) for p in prompts]
    batch = server.client().completions.create(model="a1", prompt=prompts, max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == list(range(8))
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 48 and batch.system_fingerprint == alone[0].system_fingerprint
    ids = server.post("/v1/completions", {"model": "a1", "prompt": [server.tokenize(p) for p in prompts[:3]],
                                          "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
    assert [c["text"] for c in ids["choices"]] == [a.choices[0].text for a in alone[:3]]  # token-id lists alike
    chunks = list(server.client().completions.create(model="a1", prompt=prompts[:3], max_tokens=6, temperature=0, stream=True,
                                                     n=2, seed=5, extra_body={"ignore_eos": True}))
    texts = collections.defaultdict(str)
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert [texts[i] for i in range(6)] == [a.choices[0].text for a in alone[:3] for _ in range(2)]  # greedy: i * n + j


def test_n_seeded_choices_are_the_same_alone_and_beside_a_busy_batch(server):
    """n=4 with a seed, on both endpoints: four choices, not all alike, and the same four when the
    request runs beside six other streams."""
    client = server.client()

    def ask():
        c = client.completions.create(model="a0", prompt="Once upon a time", max_tokens=12, n=4, seed=77,
                                      temperature=1.0, extra_body={"ignore_eos": True})
        chat = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2,
                                              seed=78, temperature=1.0, extra_body={"ignore_eos": True})
        assert [x.index for x in c.choices] == [0, 1, 2, 3] and [x.index for x in chat.choices] == [0, 1]
        assert c.usage.completion_tokens == 48 and chat.usage.completion_tokens == 16
        return [x.text for x in c.choices], [x.message.content for x in chat.choices]

    alone = ask()
    assert len(set(alone[0])) > 1
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        busy = [pool.submit(client.completions.create, model=m, prompt=f"busy {i}", max_tokens=40, temperature=1.0,
                            extra_body={"ignore_eos": True}) for i, m in enumerate(["a0", "a1", server.base] * 2)]
        beside = pool.submit(ask).result()
        assert all(b.result().usage.completion_tokens == 40 for b in busy)
    assert beside == alone


def test_batches_and_choices_count_against_the_limits_before_any_work(server):
    """A batch is as many requests as it has prompts, and reserves max_tokens for every choice: over the
    tenant's limits it is refused (429, never fits) before anything runs."""
    before = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {server.keys['erin']}"}).json()
    r = server.post("/v1/completions", {"model": server.base, "prompt": ["a", "b"], "max_tokens": 20, "n": 4}, user="erin")
    assert r.status_code == 429 and "can never fit" in r.json()["error"]["message"], r.text
    assert "+ max_tokens 160)" in r.json()["error"]["message"]  # 2 prompts x n=4 x 20
    r = server.post("/v1/completions", {"model": server.base, "prompt": ["a"] * 5, "max_tokens": 1}, user="fay")
    assert r.status_code == 429 and "Requested 5 (one per prompt)" in r.json()["error"]["message"], r.text
    after = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {server.keys['erin']}"}).json()
    assert after == before


def test_lm_evaluation_harness_local_completions_agrees_with_its_hf_backend(server, tmp_path):
    """lm-evaluation-harness, unchanged: its `local-completions` model (remote tokenizer from the app's
    /tokenizer_info and /tokenize, loglikelihood requests as token-id batches with echo and logprobs)
    against the app, and its `hf` backend on the same checkpoint: every choice's loglikelihood within
    2e-3, the same greedy answers."""
    from bench.lmeval import GEN_TASK, MC_TASK, compare, evaluate, write_tasks

    tasks = write_tasks(tmp_path / "tasks")
    ours = evaluate("local-completions", {"base_url": f"{server.url}/pair/v1/completions", "model": server.base,
                                          "max_length": 512}, tasks, batch_size=4)
    reference = evaluate("hf", {"pretrained": str(server.model_dir), "dtype": "float32"}, tasks)
    result = compare(ours, reference)
    assert result[MC_TASK]["loglikelihoods"] == 64 and result[MC_TASK]["max_abs_diff"] <= 2e-3, result
    assert result[MC_TASK]["accuracy"] == result[MC_TASK]["reference_accuracy"]
    assert result[GEN_TASK]["answers_equal"] == result[GEN_TASK]["items"] == 8, result


def test_tokenize_detokenize_and_tokenizer_info(server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model_dir)
    r = server.post("/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(tok("Hello world")["input_ids"]), "max_model_len": 512,
                        "tokens": tok("Hello world")["input_ids"],
                        "token_strs": [tok.decode([t]) for t in tok("Hello world")["input_ids"]]}
    messages = [{"role": "user", "content": "Hi"}]
    chat = server.post("/tokenize", {"model": "a1", "messages": messages}).json()
    cmpl = server.client().chat.completions.create(model="a1", messages=messages, max_tokens=1)
    assert chat["count"] == cmpl.usage.prompt_tokens
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    assert server.post("/detokenize", {"tokens": chat["tokens"]}).json() == {"prompt": tok.decode(chat["tokens"])}
    info = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {server.keys['alice']}"}).json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    for path, body, status, param in [("/tokenize", {"prompt": "x", "messages": messages}, 400, "prompt"),
                                      ("/tokenize", {"model": "secret", "prompt": "x"}, 404, "model"),
                                      ("/detokenize", {"tokens": [10**6]}, 400, "tokens")]:
        r = server.post(path, body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_32_concurrent_streams_over_4_adapters(server):
    async def one(i):
        stream = await server.aclient().completions.create(
            model=f"a{i % 4}", prompt=f"request {i}", max_tokens=8 + i % 5, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage, fingerprint = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            fingerprint = chunk.system_fingerprint
        return usage.completion_tokens, fingerprint

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert [n for n, _ in results] == [8 + i % 5 for i in range(32)]
    assert [f for _, f in results] == [f"a{i % 4}@v0001" for i in range(32)]


def test_tenants_see_their_own_and_shared_adapters(server):
    alice = {m.id for m in server.client("alice").models.list()}
    bob = {m.id for m in server.client("bob").models.list()}
    assert alice == {server.base, "a0", "a1", "a2", "a3", "common"}
    assert bob == {server.base, "secret", "common"}
    missing = server.post("/v1/completions", {"model": "nope", "prompt": "x"})
    other = server.post("/v1/completions", {"model": "secret", "prompt": "x"})  # bob's, asked by alice
    assert missing.status_code == other.status_code == 404
    assert other.json()["error"]["message"] == "adapter 'secret' does not exist"
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert server.post("/v1/completions", {"model": "secret", "prompt": "x", "max_tokens": 2}, user="bob").status_code == 200


@pytest.mark.parametrize("body,status,words", [
    ({"model": "BASE", "prompt": "x", "max_tokens": 600}, 400, "exceeds this model's max_seq_len of 512"),
    ({"model": "BASE", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "BASE", "prompt": "x", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"model": "BASE", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "BASE", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "BASE", "prompt": "x", "n": 9}, 400, "n (9) exceeds the 8 choices"),
    ({"model": "BASE", "prompt": [[5], [5] * 600], "max_tokens": 8}, 400, "prompt 1 of 2 (600 tokens)"),
    ({"model": "BASE", "prompt": ["x"] * 65}, 400, "65 prompts in one request, over this server's max_prompts of 64"),
    ({"model": "BASE", "prompt": "x", "max_tokens": 0}, 400, "max_tokens: 0 returns nothing without echo"),
    ({"model": "BASE"}, 400, "prompt: Field required"),
    ({"model": "BASE", "prompt": [1, 99999]}, 400, "token ids must be in"),
    ({"model": "../etc", "prompt": "x"}, 400, "invalid adapter id"),
    ({"model": "a1@latest", "prompt": "x"}, 400, "invalid version"),
    ({"model": "a1@v0042", "prompt": "x"}, 404, "has no version v0042"),
])
def test_errors_have_openai_shape_and_name_the_problem(server, body, status, words):
    body = {k: (server.base if v == "BASE" else v) for k, v in body.items()}
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]


def test_malformed_bodies_auth_and_size(server):
    headers = {"Authorization": f"Bearer {server.keys['alice']}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": ', headers=headers)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    bad_utf8 = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "\xff\xfe", "prompt": "x"}', headers=headers)
    assert bad_utf8.status_code == 400
    huge = httpx.post(f"{server.url}/v1/completions", json={"model": server.base, "prompt": "x" * 100_000}, headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    elsewhere = httpx.post(f"{server.url}/pair/v1/completions", json={"model": server.base, "prompt": "x" * 100_000})
    assert elsewhere.status_code == 400 and "max_seq_len" in elsewhere.text  # each app its own limit (pair: 1 MiB)
    nokey = server.post("/v1/completions", {"model": server.base, "prompt": "x"}, user=None)
    wrong = httpx.post(f"{server.url}/v1/completions", json={"model": server.base, "prompt": "x"},
                       headers={"Authorization": "Bearer sk-wrong"})
    assert nokey.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    ok = server.post("/v1/completions", {"model": server.base, "prompt": "still serving", "max_tokens": 2})
    assert ok.status_code == 200 and httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("route, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),  # cannot be enforced
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format"),  # not a schema
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameterz": {}}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"user": "end-user-1"}, "user"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "after"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),  # outside the vocabulary
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"no_such_field": 1}, "no_such_field"),
])
def test_fields_not_implemented_are_refused_naming_the_field(server, route, extra, param):
    body = {"model": server.base, "max_tokens": 2, **extra}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"})
    r = server.post(route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error", err


def test_values_that_mean_the_default_are_accepted(server):
    chat = server.client().chat.completions.create(
        model=server.base, messages=[{"role": "user", "content": "x"}], max_tokens=2, response_format={"type": "text"},
        tool_choice="none", presence_penalty=0, frequency_penalty=0)
    assert chat.choices[0].message.content is not None
    cmpl = server.client().completions.create(model=server.base, prompt="x", max_tokens=2, best_of=1)
    assert cmpl.usage.completion_tokens == 2
    again = server.client().chat.completions.create(  # an earlier answer sent back as the client returns it
        model=server.base, max_tokens=2, messages=[{"role": "user", "content": "x"}, chat.choices[0].message.model_dump(),
                                                   {"role": "user", "content": "y"}])
    assert again.choices[0].finish_reason in ("length", "stop")


def test_continuous_usage_stats_reports_the_usage_so_far_on_every_chunk(server):
    """vLLM's stream option, which guidellm sends: every chunk carries the usage up to it."""
    body = {"model": server.base, "prompt": "x", "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 6 and all("usage" in e for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == events[0]["usage"]["prompt_tokens"]


def test_stream_interval_sends_the_first_token_alone_then_larger_chunks(server):
    """vLLM's stream_interval ("pair" has 6): the first token leaves at once, later chunks carry at least
    6 tokens each (one replica message, one SSE chunk), and the stream says what the whole answer says."""
    body = {"model": server.base, "prompt": "Once upon a time", "max_tokens": 20, "ignore_eos": True,
            "temperature": 0, "logprobs": 0}
    whole = httpx.post(f"{server.url}/pair/v1/completions", json=body, timeout=120).json()["choices"][0]
    with httpx.stream("POST", f"{server.url}/pair/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    sizes = [len(c["logprobs"]["tokens"]) for c in chunks if c["logprobs"]]
    assert sizes[0] == 1 and sum(sizes) == 20 and all(n >= 6 for n in sizes[1:-1]) and len(sizes) <= 5, sizes
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]


def test_a_paced_replica_sends_the_first_token_at_once_and_the_rest_with_the_end(server):
    """stream_messages_per_s ("bp" has 0.001): a stream's messages after the first are spaced by the
    replica's message budget, but the first token and the end never wait, and nothing is lost. The
    last tokens and the finish reason, which the replica sends as one item, are one chunk."""
    body = {"model": server.base, "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True,
            "temperature": 0, "logprobs": 0}
    whole = httpx.post(f"{server.url}/bp/v1/completions", json=body, timeout=120).json()["choices"][0]
    with httpx.stream("POST", f"{server.url}/bp/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    assert [(len(c["logprobs"]["tokens"]) if c["logprobs"] else 0, c["finish_reason"]) for c in chunks] == \
           [(1, None), (15, "length")]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def _token_texts(server, **kw) -> list[str]:
    r = server.client().completions.create(model=server.base, prompt="Once upon a time", max_tokens=24, temperature=0,
                                           logprobs=0, extra_body={"ignore_eos": True, **kw.pop("extra", {})}, **kw)
    return r.choices[0].logprobs.tokens


def test_logit_bias_penalties_and_min_p_change_the_output_as_documented(server):
    from jaxlora.tokenizer import load_tokenizer

    tok = load_tokenizer(server.model_dir)
    forced, other = tok.encode(" the", add_special_tokens=False)[0], tok.encode(" and", add_special_tokens=False)[0]
    r = server.client().completions.create(model=server.base, prompt="x", max_tokens=6, temperature=0,
                                           logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 6)  # +100 forces the token on every step
    r = server.client().completions.create(model=server.base, prompt="x", max_tokens=6, temperature=0,
                                           logit_bias={str(forced): -100, str(other): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([other] * 6)  # -100 bans it
    plain = _token_texts(server)
    most = max(collections.Counter(plain).values())
    assert most >= 3, plain  # the random demo model repeats itself: the penalties have something to remove
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra": {"repetition_penalty": 3.0}}):
        penalised = _token_texts(server, **kw)
        assert max(collections.Counter(penalised).values()) < most, (kw, penalised)
    # min_p = 1 keeps only the most probable token: sampling at temperature 1 is then greedy
    r = server.client().completions.create(model=server.base, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                           seed=7, logprobs=0, extra_body={"ignore_eos": True, "min_p": 1.0})
    assert r.choices[0].logprobs.tokens == plain
    r = server.client().completions.create(model=server.base, prompt="Once upon a time", max_tokens=24, temperature=1.0,
                                           seed=7, logprobs=0, extra_body={"ignore_eos": True})
    assert r.choices[0].logprobs.tokens != plain  # without min_p the same seed samples other tokens


def test_models_retrieve_names_the_publish_time_and_context_length(server):
    import datetime

    client = server.client()
    base = client.models.retrieve(server.base)
    assert base.id == server.base and base.max_model_len == ENGINE["max_seq_len"]
    server.publish("alice", "dated", seed=23)
    card = client.models.retrieve("dated")
    manifest = json.loads((server.store.adapters_dir("alice") / "dated" / "v0001" / "manifest.json").read_text())
    assert card.created == int(datetime.datetime.fromisoformat(manifest["created_at"]).timestamp())
    assert card.max_model_len == ENGINE["max_seq_len"] and card.owned_by == "user:alice"
    assert card.latest_version == "v0001" and client.models.retrieve("dated@v0001").created == card.created
    listed = {m.id: m for m in client.models.list()}
    assert listed["dated"].created == card.created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("secret")  # bob's: exactly like a missing one
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


def test_back_pressure_answers_503_quickly(server):
    body = {"model": server.base, "prompt": "x", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    results = []

    def call():
        t0 = time.monotonic()
        r = httpx.post(f"{server.url}/bp/v1/completions", json=body, timeout=120)
        results.append((r.status_code, time.monotonic() - t0, r))

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(c for c, _, _ in results)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    for code, seconds, r in results:
        if code == 503:
            assert r.json()["error"]["type"] == "overloaded_error" and r.headers.get("retry-after") == "1"
        else:
            assert r.json()["usage"]["completion_tokens"] == 100
    slowest_503 = max(s for c, s, _ in results if c == 503)
    fastest_200 = min(s for c, s, _ in results if c == 200)
    assert slowest_503 < fastest_200  # refused at once, not after waiting


def test_every_request_for_an_adapter_is_served_by_its_home_replica(server):
    """The model handle's request router (serve_app.routing) sends every request for an adapter to the
    adapter's home: the first replica of its rendezvous order over the replicas' ids
    (serve_app.placement), the first request of an adapter no replica has served included. Requests one
    at a time never reach the load bound, so none leaves home. A pinned version is a key of its own."""
    replicas = _model_replica_ids("pair", 2)

    def home(model: str) -> str:  # the app has no auth: every request is the tenant "local"'s
        return rendezvous_order(adapter_key("local", model), replicas)[0]

    # Adapters published here, so no replica has served them; enough of them that both replicas are a home.
    homes, names = {}, (f"home{j}" for j in itertools.count())
    while len(homes) < 4 or set(homes.values()) != set(replicas):
        name = next(names)
        if len(homes) < 4 or home(name) not in homes.values():
            server.publish("local", name, seed=60 + len(homes))
            homes[name] = home(name)
    pinned = next(iter(homes)) + "@v0001"
    homes[pinned] = home(pinned)
    served = collections.defaultdict(list)
    for _ in range(3):
        for model in homes:
            r = httpx.post(f"{server.url}/pair/v1/completions", timeout=60, json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            served[model].append(r.headers["x-jaxlora-replica"])
    assert served == {model: [replica] * 3 for model, replica in homes.items()}, (replicas, dict(served))


def _model_replica_ids(app: str, n: int) -> list[str]:
    """The ids of the app's n model replicas, as each names itself (`stats`, called on every replica)."""
    from ray.serve.exceptions import DeploymentUnavailableError

    handle = _model_handle(app)
    deadline = time.monotonic() + 60
    while True:  # until this handle has heard of every replica
        try:
            ids = sorted(stats["replica"] for stats in handle.broadcast("stats").results(timeout_s=60))
        except DeploymentUnavailableError:  # of none yet
            ids = []
        if len(ids) == n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ids) == n, ids
    return ids


def _model_handle(app: str):
    handle = serve.get_deployment_handle("LoRAModel", app_name=app)
    if not handle.is_initialized:  # the driver has no event loop: route on Serve's own thread in either mode
        handle._init(_run_router_in_separate_loop=True)
    return handle


def _model_stats(app: str) -> dict:
    return _model_handle(app).stats.remote().result()


def test_client_disconnect_frees_the_engine_row(server):
    before = _model_stats("main")["requests_cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {server.keys['alice']}"},
                      json={"model": server.base, "prompt": "x", "max_tokens": 120, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = _model_stats("main")
        if stats["requests_cancelled"] > before and stats["active_rows"] == 0:
            break
        time.sleep(0.2)
    assert stats["requests_cancelled"] > before and stats["active_rows"] == 0, (before, stats)


def test_hot_reload_switches_within_2_seconds_without_failures(server):
    client = server.client()
    seen, published_at, switched_at = [], None, None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = client.completions.create(model="a3", prompt="Hello", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
        seen.append((time.monotonic(), r.system_fingerprint, r.choices[0].text))
        if len(seen) == 3:
            server.publish("alice", "a3", seed=99)
            published_at = time.monotonic()
        if published_at and r.system_fingerprint == "a3@v0002":
            switched_at = time.monotonic()
            break
    assert switched_at is not None, seen
    assert switched_at - published_at < 2.0
    old = {text for _, fp, text in seen if fp == "a3@v0001"}
    assert seen[-1][2] not in old  # the new version really answers differently


def test_training_through_ray_is_served_without_restart(server, tmp_path):
    from training.ray_entry import submit
    from training.spec import TrainSpec

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) + "\n" for i in range(8)))
    spec = TrainSpec(user_id="alice", adapter_id="trained", data=str(data), model_dir=str(server.model_dir),
                     fs_root=str(server.store.fs_root), steps=4, batch_size=4, max_length=32, lora={"r": 4, "alpha": 8})
    before = {m.id for m in server.client().models.list()}
    result = ray.get(submit([spec])[0], timeout=300)
    assert result["version"] == "v0001" and "trained" not in before
    r = server.client().completions.create(model="trained", prompt="Q1:", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.system_fingerprint == "trained@v0001"
    result = ray.get(submit([spec])[0], timeout=300)  # train again: a new version, served within the poll interval
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = server.client().completions.create(model="trained", prompt="Q1:", max_tokens=3, extra_body={"ignore_eos": True})
        if r.system_fingerprint == "trained@v0002":
            break
        time.sleep(0.2)
    assert r.system_fingerprint == "trained@v0002"


def test_corrupt_new_version_leaves_the_old_one_serving(server):
    server.publish("alice", "fragile", seed=21)
    client = server.client()
    assert client.completions.create(model="fragile", prompt="x", max_tokens=2).system_fingerprint == "fragile@v0001"
    failures_before = _model_stats("main")["adapter_reload"]["reload_failures"]

    def corrupt(folder):
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # a truncated upload

    server.store.publish("alice", "fragile", corrupt, base_model={"name": server.base, "fingerprint": server.fingerprint})
    deadline, served = time.monotonic() + 2.5, []
    while time.monotonic() < deadline:
        r = client.completions.create(model="fragile", prompt="x", max_tokens=2)  # raises on any failure
        served.append(r.system_fingerprint)
    assert set(served) == {"fragile@v0001"}
    assert _model_stats("main")["adapter_reload"]["reload_failures"] > failures_before


def test_deleted_adapter_becomes_404_and_others_are_unaffected(server):
    import shutil

    server.publish("alice", "doomed", seed=22)
    client = server.client()
    client.completions.create(model="doomed", prompt="x", max_tokens=2)
    shutil.rmtree(server.store.adapters_dir("alice") / "doomed")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = server.post("/v1/completions", {"model": "doomed", "prompt": "x", "max_tokens": 2})
        if r.status_code == 404:
            break
        time.sleep(0.1)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.completions.create(model="a0", prompt="x", max_tokens=2).system_fingerprint == "a0@v0001"


def test_health_check_fails_when_the_engine_loop_died():
    from serve_app.deployments import LoRAModel

    class DeadBackend:
        healthy = False

        class scheduler:
            error = RuntimeError("device fell over")

    replica = LoRAModel.func_or_class.__new__(LoRAModel.func_or_class)
    replica.backend = DeadBackend()
    with pytest.raises(RuntimeError, match="engine loop is not running.*device fell over"):
        replica.check_health()
    replica.backend.healthy = True
    replica.check_health()
    del replica.backend  # nothing to close


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value=1.0, tags=None):
        self.calls.append((value, tags))


def _admit(tenants, tier, body, prompt_tokens, **args):
    """The ingress's `_admit` without Serve, on an object with only what it reads; returns the decision
    and the unchecked-request counter."""
    import types

    from serve_app.config import AppArgs
    from serve_app.ingress import Call, Ingress
    from serve_app.limits import Limits

    a = AppArgs(**args)
    ingress = types.SimpleNamespace(args=a, limits=Limits(a.requests_per_minute, a.tokens_per_minute), tenants=tenants,
                                    metrics={"jaxlora_rate_limit_unchecked": _Recorder()})
    call = Call("completions", body, tenant="alice", tier=tier, prompts=[[0] * prompt_tokens])
    decision = asyncio.run(Ingress.func_or_class._admit(ingress, call))
    return decision, ingress.metrics["jaxlora_rate_limit_unchecked"].calls


class _Call:
    """A handle call that answers `answer` (or raises it) after `delay` seconds."""

    def __init__(self, answer, delay=0.0):
        self.answer, self.delay, self.cancelled = answer, delay, False

    def __await__(self):
        async def wait():
            await asyncio.sleep(self.delay)
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer
        return wait().__await__()

    def cancel(self):
        self.cancelled = True


class _Tenants:
    def __init__(self, call: _Call):
        self.call, self.asked = call, []
        self.admit = self

    def remote(self, *args):
        self.asked.append(args)
        return self.call


def test_rate_limits_fail_open_when_tenant_state_is_slow_or_unreachable():
    """The ingress's admission without Serve: a TenantState slower than rate_limit_timeout_s, or one that
    cannot be reached, lets the request through unchecked, cancels the call and counts it; a refusal
    that arrives in time is the 429; a tenant without limits never asks."""
    from serve_app.errors import ApiError
    from serve_app.keys import Tier
    from serve_app.limits import Limiter, Limits
    from serve_app.openai_api import ChatCompletionRequest, CompletionRequest

    body = CompletionRequest(model="m", prompt="x", max_tokens=7)
    for call in (_Call(None, delay=5.0), _Call(RuntimeError("TenantState replica died"))):
        t0 = time.monotonic()
        decision, unchecked = _admit(tenants := _Tenants(call), Tier(), body, 3, rate_limit_timeout_s=0.05,
                                     requests_per_minute=10)
        assert decision is None and time.monotonic() - t0 < 1.0 and tenants.asked == [("alice", Limits(10, None), 3, 7, 1)]
        assert call.cancelled and unchecked == [(1.0, {"tenant": "alice"})]
    limiter = Limiter()
    limiter.admit("alice", Limits(1, None), 3, 7)
    with pytest.raises(ApiError) as e:
        _admit(_Tenants(_Call(limiter.admit("alice", Limits(1, None), 3, 7))), Tier(), body, 3, requests_per_minute=1)
    assert e.value.status == 429 and e.value.type == "requests"
    assert _admit(tenants := _Tenants(_Call(None)), Tier(), body, 3) == (None, []) and tenants.asked == []  # no limits
    # A tier's own limit applies over no default; without max_tokens the rest of the context is reserved.
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    _admit(tenants := _Tenants(_Call(None, delay=5.0)), Tier(tokens_per_minute=500), chat, 10, rate_limit_timeout_s=0.05,
           engine={"max_seq_len": 96})
    assert tenants.asked == [("alice", Limits(None, 500), 10, 96 - 10, 1)]


def test_a_tiers_row_and_queue_limits_reach_the_engine():
    """LoRAModel.generate passes the tier's max_rows / max_queued from `Generate` to `backend.submit`."""
    from jaxlora.errors import TenantOverLimit
    from jaxlora.sampling import SamplingParams
    from serve_app.deployments import LoRAModel
    from serve_app.wire import Failed, Generate

    class Backend:
        def submit(self, *args):
            self.args = args
            raise TenantOverLimit("alice has 2 requests waiting (its tier's max_queued); retry when one has started")

    replica = LoRAModel.func_or_class.__new__(LoRAModel.func_or_class)
    replica.backend = Backend()

    async def first():
        return await anext(replica.generate(Generate((1, 2), SamplingParams(), None, "alice", 2.0, max_rows=3,
                                                     max_queued=2)))

    reply = asyncio.run(first())
    assert replica.backend.args[3:] == ("alice", 2.0, 3, 2, None)  # ..., no grammar
    assert isinstance(reply, Failed) and reply.status == 429 and reply.code == "rate_limit_exceeded"
    del replica.backend  # nothing to close


def test_metrics_are_exported_from_the_model_replica(server):
    """The replica's stats count what this test's own requests did (no other test sends traffic meanwhile)."""
    from jaxlora import kernels

    for i in range(2):
        server.publish("alice", f"counted{i}", seed=50 + i)  # new adapters: each is loaded exactly once
    before = _model_stats("main")
    usages = [server.client().completions.create(model=model, prompt=f"count {model}", max_tokens=3,
                                                 extra_body={"ignore_eos": True}).usage
              for model in (server.base, "counted0", "counted1")]
    stats = _model_stats("main")
    for name in ("requests_submitted", "requests_finished"):
        assert stats[name] - before[name] == 3, name
    assert stats["prompt_tokens"] - before["prompt_tokens"] == sum(u.prompt_tokens for u in usages)
    assert stats["adapter_cache"]["loads"] - before["adapter_cache"]["loads"] == 2
    assert stats["compilations"] > 0 and 0 < stats["batch_occupancy"] <= 1
    # ENGINE keeps the default float32, so the replica decodes with the kernels exactly where they build.
    assert stats["decode_kernels"] is kernels.available()


class _Scrape:
    """One read of this node's Prometheus endpoint (Ray's metrics agent), as Prometheus parses it."""

    def __init__(self):
        from prometheus_client.parser import text_string_to_metric_families

        port = ray._private.worker.global_worker.node.metrics_export_port
        families = list(text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text))
        self.kind = {s.name: f.type for f in families for s in f.samples}  # sample name -> its family's type
        self.samples = [s for f in families for s in f.samples]

    def total(self, name: str, **labels: str) -> float:
        """The sum over the series of `name` whose labels match (an absent label matches "")."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k, "") == v for k, v in labels.items()))

    @classmethod
    def until(cls, condition, timeout: float = 90.0) -> "_Scrape":
        """Scrapes until `condition(scrape)` holds or the deadline passes (Ray exports every few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = cls()
            if condition(scrape) or time.monotonic() > deadline:
                return scrape
            time.sleep(0.5)


def test_prometheus_counts_usage_per_tenant_and_model(server):
    """Through Ray's real Prometheus export: per tenant and model, the token counters equal the usage
    the responses reported (streamed or not), the request counter and the TTFT/TPOT/e2e histograms count
    each answer, and the engine's totals are counters that reach the replica's own numbers."""
    from serve_app.metrics import INGRESS_METRICS, MODEL_METRICS

    main = {"application": "main"}
    for i, user in enumerate(("alice", "bob")):
        server.publish(user, "metered", seed=40 + i)  # two tenants, each with their own "metered"
    # A request no other test makes: once each metric shows its series, every earlier sample of that metric
    # in the (one) ingress replica has been exported too. Ray exports a metric with all its series, but not
    # every metric in the same round (a latency histogram can lag the request counter), so the baseline
    # waits for all of the marker's series.
    r = server.post("/v1/completions", {"model": "metered", "prompt": "mark", "max_tokens": 2, "ignore_eos": True},
                    user="bob")
    assert r.status_code == 200, r.text
    usage_labels = {"tenant": "bob", "model": "metered", "adapter_version": "v0001", **main}
    latency_labels = {"route": "completions", "model": "metered", **main}
    marks = [("ray_jaxlora_requests_total", {"tenant": "bob", "model": "metered", "route": "completions", "status": "200",
                                             **main}, 1),
             ("ray_jaxlora_prompt_tokens_total", usage_labels, r.json()["usage"]["prompt_tokens"]),
             ("ray_jaxlora_completion_tokens_total", usage_labels, 2)]
    marks += [(f"ray_jaxlora_{h}_seconds_count", latency_labels, 1)
              for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency")]
    before = _Scrape.until(lambda s: all(s.total(name, **labels) >= n for name, labels, n in marks))
    assert [before.total(name, **labels) for name, labels, _ in marks] == [n for _, _, n in marks]

    want = collections.Counter()  # (sample name, labels) -> expected growth
    calls = [("alice", "completions", server.base, False, 5), ("alice", "chat", "metered", True, 7),
             ("bob", "chat", server.base, False, 4), ("bob", "completions", "metered", True, 6),
             ("alice", "completions", "metered", False, 3)]
    for user, route, model, stream, n in calls:
        kw = {"model": model, "max_tokens": n, "temperature": 0, "extra_body": {"ignore_eos": True}}
        if stream:
            kw |= {"stream": True, "stream_options": {"include_usage": True}}
        client = server.client(user)
        if route == "chat":
            out = client.chat.completions.create(messages=[{"role": "user", "content": f"bill {user}"}], **kw)
        else:
            out = client.completions.create(prompt=f"bill {user} for this", **kw)
        usage = [c.usage for c in out if c.usage][-1] if stream else out.usage
        assert usage.completion_tokens == n
        tokens = (("tenant", user), ("model", model), ("adapter_version", "" if model == server.base else "v0001"))
        want["ray_jaxlora_prompt_tokens_total", tokens] += usage.prompt_tokens
        want["ray_jaxlora_completion_tokens_total", tokens] += usage.completion_tokens
        want["ray_jaxlora_requests_total", (("tenant", user), ("model", model), ("route", route), ("status", "200"))] += 1
        for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
            want[f"ray_jaxlora_{h}_seconds_count", (("route", route), ("model", model))] += 1

    def growth(s: _Scrape) -> dict:
        return {k: s.total(k[0], **dict(k[1]), **main) - before.total(k[0], **dict(k[1]), **main) for k in want}

    after = _Scrape.until(lambda s: all(g >= want[k] for k, g in growth(s).items()))
    assert growth(after) == dict(want)

    for m in MODEL_METRICS + INGRESS_METRICS:  # each exported with its kind; the old gauge forms are gone
        for name in m.prometheus_names():
            assert after.kind.get(name, m.kind) == m.kind, name
    for name in ("ray_jaxlora_compilations_total", "ray_jaxlora_adapter_loads_total", "ray_jaxlora_queue_depth",
                 "ray_jaxlora_engine_generated_tokens_total", "ray_jaxlora_time_to_first_token_seconds_bucket"):
        assert name in after.kind, name
    assert not {"ray_jaxlora_compilations", "ray_jaxlora_ttft_ms_count", "ray_jaxlora_http_requests_total"} & set(after.kind)

    seen = {}

    def engine_matches(s: _Scrape) -> bool:  # the sum of the increments is the engine's cumulative total
        stats = _model_stats("main")
        seen.update(stats=stats, exported=[s.total(f"ray_jaxlora_{n}_total", **main) for n in
                                           ("compilations", "adapter_loads", "engine_generated_tokens")])
        return seen["exported"] == [stats["compilations"], stats["adapter_cache"]["loads"], stats["generated_tokens"]]

    assert engine_matches(_Scrape.until(engine_matches)), seen


def test_cumulative_totals_become_counter_increments():
    """The seam between the engine's totals and Ray's counters: increments are the growth, never negative."""
    from serve_app.metrics import MODEL_METRICS, CounterExport

    class Recorder:
        def __init__(self):
            self.calls = []

        def inc(self, value, tags=None):
            self.calls.append(("inc", value, tags))

        def set(self, value, tags=None):
            self.calls.append(("set", value, tags))

    metrics = {m.name: Recorder() for m in MODEL_METRICS}
    export = CounterExport(MODEL_METRICS, metrics)
    for compilations, finished in ((3, 0), (5, 2), (5, 2), (1, 2), (4, 3)):  # (1, 2): the total went down
        export.export({"compilations": compilations, "requests_finished": finished, "queue_depth": compilations,
                       "decode_kernels": True})
    assert metrics["jaxlora_compilations"].calls == [("inc", 3.0, None), ("inc", 2.0, None), ("inc", 3.0, None)]
    assert metrics["jaxlora_engine_requests"].calls == [("inc", 2.0, {"outcome": "finished"}), ("inc", 1.0, {"outcome": "finished"})]
    assert [v for _, v, _ in metrics["jaxlora_queue_depth"].calls] == [3.0, 5.0, 5.0, 1.0, 4.0]
    assert metrics["jaxlora_decode_kernels"].calls[-1] == ("set", 1.0, None)
    assert metrics["jaxlora_adapter_loads"].calls == []  # not in the snapshot: nothing exported


def test_readme_and_dashboard_name_only_exported_metrics():
    import re

    from serve_app.metrics import INGRESS_METRICS, MODEL_METRICS

    table = MODEL_METRICS + INGRESS_METRICS
    root = Path(__file__).parent.parent
    dashboard = json.loads((root / "docs/grafana/jaxlora.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert set(re.findall(r"ray_jaxlora_\w+", queries)) <= {n for m in table for n in m.prometheus_names()}
    readme = (root / "README.md").read_text().split("\n## Metrics\n")[1].split("\n## ")[0]
    documented = {f"ray_{m.name}" if m.kind == "histogram" else m.prometheus_names()[0] for m in table}
    assert set(re.findall(r"`(ray_jaxlora_\w+)`", readme)) == documented  # each listed once under its Prometheus name


@pytest.fixture(scope="module")
def fault_app(server, tmp_path_factory):
    """An app of its own for the tests that break its model replica, which Serve then replaces: the
    replica reads a fault trigger (tests/fault_site/sitecustomize.py) and is asked what it holds."""
    trigger = tmp_path_factory.mktemp("fault") / "fault"
    hook_env = {"env_vars": {"JAXLORA_TEST_FAULT_FILE": str(trigger), "PYTHONPATH": str(Path(__file__).parent / "fault_site")}}
    serve.run(build_app({**server.common, "engine": {**ENGINE, "max_seq_len": 512}, "model_runtime_env": hook_env}), name="fault",
              route_prefix="/fault")
    yield trigger
    serve.delete("fault")


def test_engine_step_failure_fails_its_requests_and_the_replica_is_replaced(server, fault_app):
    """Fault (e) end to end: a decode step raises inside a running replica (injected by
    tests/fault_site/sitecustomize.py). Every request on it gets an error, the health check fails, Serve replaces
    the replica, and requests succeed again."""
    trigger = fault_app
    url = f"{server.url}/fault/v1/completions"
    body = {"model": server.base, "prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    r = httpx.post(url, json={**body, "max_tokens": 3}, timeout=120)
    assert r.status_code == 200, r.text
    old_replica = r.headers["x-jaxlora-replica"]
    results, streaming = {}, threading.Event()

    def plain(i):
        r = httpx.post(url, json=body, timeout=120)
        results[i] = (r.status_code, r.json())

    def stream():
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    streaming.set()
            results["stream"] = (r.status_code, events)

    threads = [threading.Thread(target=plain, args=(i,)) for i in range(2)] + [threading.Thread(target=stream)]
    for t in threads:
        t.start()
    assert streaming.wait(60)
    trigger.touch()  # the next decode step fails
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request hung after the engine failed"
    assert not trigger.exists(), "the injected fault did not fire"
    for i in range(2):
        status, out = results[i]
        assert status == 500 and out["error"]["type"] == "internal_error", out
    status, events = results["stream"]
    assert status == 200 and "choices" in events[0] and "error" in events[-1], events[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # refused clearly (503) until Serve has replaced the replica
        r = httpx.post(url, json={**body, "max_tokens": 3}, timeout=120)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error", r.text
        time.sleep(0.5)
    assert r.status_code == 200 and r.headers["x-jaxlora-replica"] != old_replica, (r.status_code, r.headers)


def test_killed_model_replica_fails_in_flight_requests_clearly_and_recovers(server, fault_app):
    """A model replica is killed while its engine holds a request: the request fails at once with a 503 the
    client may retry, /health says so, the other apps are unaffected, and Serve replaces the replica. On the
    fault tests' app, so the test can ask the replica's engine when the request is on it."""
    from ray.util import list_named_actors

    def replicas():
        return [a for a in list_named_actors(all_namespaces=True) if "fault#LoRAModel" in a["name"]]

    deadline = time.monotonic() + 60
    while len(replicas()) != 1:  # a replica an earlier test broke may still be stopping
        assert time.monotonic() < deadline, replicas()
        time.sleep(0.2)
    body = {"model": server.base, "prompt": "x", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    result = {}

    def call():
        r = httpx.post(f"{server.url}/fault/v1/completions", json=body, timeout=120)
        result.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 60
    while _model_stats("fault")["active_rows"] == 0:  # until the request holds an engine row
        assert t.is_alive() and time.monotonic() < deadline, ("the request never reached the engine", result)
        time.sleep(0.05)
    (replica,) = replicas()
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    t.join(timeout=60)
    assert not t.is_alive(), "the in-flight request hung"
    assert result["status"] == 503 and result["body"]["error"]["code"] == "replica_failed", result
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Serve notices the death (health checks every 2 s) well before a new
        health = httpx.get(f"{server.url}/fault/health", timeout=30)  # replica has loaded and compiled the model
        if health.status_code != 200:
            break
        time.sleep(0.2)
    assert health.status_code == 503 and "LoRAModel has no running replica" in health.json()["error"]["message"], health.text
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # the other apps are unaffected
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve starts a new replica; requests succeed again
        r = httpx.post(f"{server.url}/fault/v1/completions", json={**body, "max_tokens": 3}, timeout=120)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200
    running = httpx.get(f"{server.url}/fault/health", timeout=30).json()["running_replicas"]
    assert running == {"Tokenizer": 1, "LoRAModel": 1, "TenantState": 1}


def test_response_format_json_schema_answers_validate_and_stream_as_they_answer_whole(server):
    """Sampled answers (temperature 1) of both endpoints follow the schema and end where it does; a
    streamed answer with the same seed is the same text."""
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        chat = dict(model=server.base, messages=[{"role": "user", "content": "Who?"}], max_tokens=96, seed=seed,
                    temperature=1.0, response_format=fmt)
        whole = client.chat.completions.create(**chat)
        assert whole.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)
                           if c.choices)
        assert streamed == whole.choices[0].message.content
    text = client.completions.create(model=server.base, prompt="Who?", max_tokens=96, seed=5,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), PERSON)
    # n choices: each row its own matcher (the forked ones start where the prompt ends), each answer valid
    several = client.chat.completions.create(model=server.base, messages=[{"role": "user", "content": "Who?"}], n=3,
                                             max_tokens=96, seed=9, temperature=1.0, response_format=fmt)
    assert [c.finish_reason for c in several.choices] == ["stop"] * 3
    for c in several.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in several.choices}) > 1


# Short: the tiny model's tokenizer spends about a token a character on JSON, and its context is 512.
TOOLS = [{"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                      "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}}]


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_tool_choice_required_and_named_force_calls_that_stream_as_they_answer_whole(server):
    """A forced call (tool_choice required with parallel_tool_calls false, or a named function) is one
    call to the request's tools (the named one) with arguments that follow its schema, finish_reason
    tool_calls; a stream's tool-call deltas (id and name first, then the arguments) reassemble into
    the same calls. (Parallel calls are bounded by nothing a random model respects: the grammars'
    own test covers them.)"""
    client = server.client()
    history = [{"role": "user", "content": "Weather in Oslo?"}]
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        body = dict(model=server.base, messages=history, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                    max_tokens=100, seed=3, temperature=1.0)
        whole = client.chat.completions.create(**body)
        choice0 = whole.choices[0]
        assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
        calls = _calls(choice0.message)
        assert len(calls) == 1 and choice0.message.tool_calls[0].id.startswith("call_")
        for name, arguments in calls:
            schema = next(t["function"].get("parameters") for t in TOOLS if t["function"]["name"] == name)
            jsonschema.validate(arguments, schema or {"type": "object", "maxProperties": 0})
        if choice != "required":
            assert calls[0][0] == "weather"
        deltas = {}  # index -> [id, name, arguments]
        for chunk in client.chat.completions.create(**body, stream=True):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = deltas.setdefault(d.index, [None, None, ""])
                if d.id:
                    assert entry[2] == "", "the id and name come before the arguments"
                    entry[0], entry[1] = d.id, d.function.name
                entry[2] += d.function.arguments or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                assert chunk.choices[0].finish_reason == "tool_calls"
        assert [(deltas[i][1], json.loads(deltas[i][2])) for i in sorted(deltas)] == calls
        # the calls and their results go back through the template, and the conversation goes on
        followup = history + [choice0.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in choice0.message.tool_calls]
        plain = client.chat.completions.create(model=server.base, messages=history, max_tokens=1)
        more = client.chat.completions.create(model=server.base, messages=followup, max_tokens=4)
        assert more.usage.prompt_tokens > plain.usage.prompt_tokens + len(choice0.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS + [TOOLS[1]]}, "tools"),
])
def test_tool_requests_that_cannot_be_served_are_refused_naming_the_field(server, extra, param):
    body = {"model": server.base, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **extra}
    r = server.post("/v1/chat/completions", {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
