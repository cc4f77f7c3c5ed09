"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, every 4xx in OpenAI's shape,
and a good share of requests accepted, so the engine, sampling, streaming, logprobs and adapters are
fuzzed too, not only the validation in front of them.

    python -m bench.fuzz [--requests 1000] [--url http://127.0.0.1:8000]

Without --url it starts its own app (as bench.load does). Every operation is fuzzed in two modes:
positive cases are drawn from the app's schema narrowed to what this deployment can serve
(`fitted_schema`: the model names GET /v1/models lists, a few new tokens, short prompts, small token
ids), so most of them reach a model replica; negative cases are drawn from the schema as the app
publishes it (only `model` held to the served names, so that it too is mutated), deliberately
invalid. A few hand-written valid requests (`explicit_cases`) make sure every deep path is taken at
least once, and hand-written hostile bodies go last. Every response is read to its end (a stream
through its `[DONE]`). Prints one JSON line last: requests sent, counts by
status and by operation, the accepted share, and any failures: a 5xx, a 4xx whose body is not
{"error": {"message", "type", "param", "code"}}, a 200 that is not JSON, or a stream that is not
well-formed SSE, ends without `[DONE]`, or carries an `internal_error` event.

It does not check what the model says (bench.load and the tests do), only that the server answers.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import socket

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable

from bench.common import emit, machine

HOSTILE = [  # (content bytes or JSON, content type)
    (b'{"model": "m", "prompt": "\xff\xfe\xfa"}', "application/json"),
    (b"\x00\x01\x02", "application/json"),
    (b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
    (json.dumps({"model": "m", "messages": []}).encode(), "application/json"),
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 5000}]}).encode(),
     "application/json"),
    (json.dumps({"model": "m", "prompt": "x", "max_tokens": 10**12}).encode(), "application/json"),
    (json.dumps({"model": "m", "prompt": "x", "temperature": -1, "top_p": 2}).encode(), "application/json"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "application/json"),
    (b'{"model": "m", "prompt": "x", "seed": 1e400}', "application/json"),
    (json.dumps({"model": "m", "prompt": [-1, 2**40]}).encode(), "application/json"),
    (json.dumps({"model": "../../../../etc/passwd", "prompt": "x"}).encode(), "application/json"),
    (json.dumps({"model": "x" * 10000, "prompt": "x"}).encode(), "application/json"),
    (b"model=m&prompt=x", "application/x-www-form-urlencoded"),
    (b"x" * (2 << 20), "application/json"),
]

# What a positive case may ask for. The budget keeps prompt + max_tokens within max_seq_len for
# nearly every draw: a prompt character is one to four byte-level tokens, a chat message adds its
# template's few.
MAX_NEW_TOKENS = 16
PROMPT_CHARS = 24  # a completion prompt, and each chat message's text
MAX_MESSAGES = 3
SMALL_TOKEN_ID = r"^(0|[1-9][0-9]?)$"  # ids 0..99: inside any vocabulary (the API does not publish its size)
BATCH = 25  # cases per (operation, mode) and round, so every operation gets its turn before the budget runs out


def served_models(client: httpx.Client) -> tuple[list[str], int]:
    """The names a request may use (the base model, every adapter, one adapter pinned to its first
    version) and the model's max_seq_len, as GET /v1/models reports them."""
    cards = client.get("/v1/models").raise_for_status().json()["data"]
    pinned = [f"{c['id']}@{c['versions'][0]}" for c in cards if c.get("versions")][:1]
    return [c["id"] for c in cards] + pinned, cards[0]["max_model_len"]


def named_schema(raw: dict, models: list[str]) -> dict:
    """The app's OpenAPI schema with `model` (in a body or the path) one of `models`. The negative
    mode draws from this one, so besides invalid bodies it sends names that are not served."""
    s = copy.deepcopy(raw)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        s["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": models}
    for p in s["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        if p["name"] == "model_id":
            p["schema"] = {"type": "string", "enum": models}
    return s


def fitted_schema(raw: dict, models: list[str]) -> dict:
    """`named_schema` narrowed to requests this deployment should accept: at most MAX_NEW_TOKENS new
    tokens, short non-empty prompts and short messages, token ids below 100, `stream` always given,
    and the fields the server accepts with one value only (`best_of`, `suffix`, `response_format`,
    `tools`, `tool_choice`) held to it. Everything else (sampling ranges, logprobs, stop, penalties)
    is left as the app declares it."""
    s = named_schema(raw, models)
    schemas = s["components"]["schemas"]

    def nullable(x: dict) -> dict:
        return {"anyOf": [x, {"type": "null"}]}

    def text(n: int, at_least: int = 0) -> dict:
        return {"type": "string", "minLength": at_least, "maxLength": n}

    def integer(low: int, high: int) -> dict:  # int bounds: float ones (1.0) let schemathesis draw 2.0
        return {"type": "integer", "minimum": low, "maximum": high}

    new_tokens = nullable(integer(1, MAX_NEW_TOKENS))
    sampling = {
        "max_tokens": new_tokens,
        "top_k": integer(-1, 256),
        "n": {"type": "integer", "enum": [1]},
        "seed": nullable(integer(0, 2**32)),
        "stop": {"anyOf": [text(8), {"type": "array", "items": text(8), "maxItems": 4}, {"type": "null"}]},
        "logit_bias": nullable({"type": "object", "propertyNames": {"pattern": SMALL_TOKEN_ID}, "maxProperties": 4,
                                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
    }
    token_id = integer(0, 99)
    schemas["CompletionRequest"]["properties"].update(sampling, **{
        "prompt": {"anyOf": [text(PROMPT_CHARS, 1), {"type": "array", "items": token_id, "minItems": 1, "maxItems": 32},
                             {"type": "array", "items": text(PROMPT_CHARS, 1), "minItems": 1, "maxItems": 1}]},
        "logprobs": nullable(integer(0, 5)),
        "best_of": nullable({"type": "integer", "enum": [1]}),
        "suffix": nullable(text(0)),
    })
    schemas["ChatCompletionRequest"]["properties"].update(sampling, **{
        "messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1,
                     "maxItems": MAX_MESSAGES},
        "top_logprobs": nullable(integer(0, 5)),
        "max_completion_tokens": new_tokens,
        "response_format": nullable({"type": "object", "properties": {"type": {"enum": ["text"]}}, "required": ["type"],
                                     "additionalProperties": False}),
        "tools": nullable({"type": "array", "maxItems": 0}),
        "tool_choice": nullable({"type": "string", "enum": ["none"]}),
    })
    for name in ("CompletionRequest", "ChatCompletionRequest"):  # drawn rather than mostly left out: half the cases stream
        schemas[name]["required"].append("stream")
    schemas["ChatMessage"]["properties"].update({
        "content": {"anyOf": [text(PROMPT_CHARS), {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"},
                                                   "maxItems": 2}, {"type": "null"}]},
        "name": nullable(text(16)),
        "refusal": nullable(text(16)),
    })
    schemas["TextPart"]["properties"]["text"] = text(PROMPT_CHARS // 2)
    return s


def explicit_cases(models: list[str], max_seq_len: int) -> list[tuple[str, dict]]:
    """Valid requests that take each deep path at least once, whatever the draws: every model name,
    streaming with usage, logprobs, logit_bias, stop, penalties, token-id prompts, and a prompt that
    fills max_seq_len exactly."""
    base, adapters = models[0], models[1:]
    cases = [("/v1/completions", {"model": m, "prompt": "the adapter serves", "max_tokens": 4}) for m in models]
    cases += [
        ("/v1/completions", {"model": adapters[0] if adapters else base, "prompt": "What does the cache do?",
                             "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
                             "logprobs": 5, "logit_bias": {"5": 100, "7": -100}, "stop": ["\n", "e"], "seed": 7}),
        ("/v1/completions", {"model": adapters[-1] if adapters else base, "prompt": [1, 2, 3, 4], "max_tokens": 16,
                             "ignore_eos": True, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "presence_penalty": 1.5,
                             "frequency_penalty": -1.0, "repetition_penalty": 1.3, "temperature": 0.0}),
        ("/v1/completions", {"model": base, "prompt": [3] * (max_seq_len - MAX_NEW_TOKENS), "max_tokens": MAX_NEW_TOKENS,
                             "ignore_eos": True, "stream": True}),
        ("/v1/completions", {"model": base, "prompt": ["x"], "best_of": 1, "suffix": "", "echo": False,
                             "stop": "", "max_tokens": 3}),
        ("/v1/chat/completions", {"model": adapters[0] if adapters else base, "max_completion_tokens": 8,
                                  "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
                                  "top_logprobs": 3, "response_format": {"type": "text"}, "tools": [],
                                  "tool_choice": "none",
                                  "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": [{"type": "text", "text": "Why is "},
                                                                            {"type": "text", "text": "JAX fast?"}]}]}),
        ("/v1/chat/completions", {"model": base, "max_tokens": 6, "repetition_penalty": 2.0, "logit_bias": {"9": -100},
                                  "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": None, "refusal": None, "tool_calls": []},
                                               {"role": "user", "content": "again", "name": "bob"}]}),
    ]
    return cases


def whole_ints(value):
    """`value` with integral floats spelled as ints. Schemathesis spells some JSON integers as `2.0`
    (an integer in JSON Schema), which this server's strict models refuse as a float; the negative
    mode keeps them, positive cases send `2` so that they get past validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [whole_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: whole_ints(v) for k, v in value.items()}
    return value


def well_formed_error(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


def sse_problem(lines, stream_errors: collections.Counter) -> str | None:
    """Reads an SSE body to its end; what is wrong with it, or None. An error event is counted by its
    type; one of type internal_error (a 5xx mid-stream) is a failure, as is a stream cut short."""
    done = False
    for line in lines:
        if not line.startswith("data: "):
            if line and not line.startswith(":"):
                return f"not an SSE line: {line[:100]!r}"
            continue
        if done:
            return "data after [DONE]"
        if line == "data: [DONE]":
            done = True
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            return f"event is not JSON: {line[:100]!r}"
        if "error" in event:
            err = event["error"]
            stream_errors[err.get("type") if isinstance(err, dict) else "malformed"] += 1
            if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
                return f"malformed error event: {line[:200]}"
            if err["type"] == "internal_error":
                return f"internal_error mid-stream: {line[:200]}"
    return None if done else "stream ended without [DONE]"


def _calling(send):
    """A one-argument test body for @given (which refuses functions with defaults)."""
    def body(case):
        send(case)
    return body


def main(argv: list[str] | None = None) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--url")
    args = ap.parse_args(argv)
    if args.url:
        url = args.url
    else:
        from bench.load import start_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start_app(port)
        url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=120)
    raw = client.get("/openapi.json").raise_for_status().json()
    models, max_seq_len = served_models(client)
    schemas = {GenerationMode.POSITIVE: schemathesis.openapi.from_dict(fitted_schema(raw, models)),
               GenerationMode.NEGATIVE: schemathesis.openapi.from_dict(named_schema(raw, models))}

    def operations(schema):
        ops = [op.ok() for op in schema.get_all_operations()]
        return [op for op in ops if not op.path.startswith(("/docs", "/redoc"))]

    by_status: collections.Counter = collections.Counter()
    per_operation: dict = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    stream_errors: collections.Counter = collections.Counter()
    failures: list[str] = []
    sent = streams = 0

    def send(operation: str, mode: str, method: str, path: str, *, json_body=None, content=None, headers=None,
             params=None) -> None:
        nonlocal sent, streams
        with client.stream(method, path, json=json_body, content=content, headers=headers, params=params) as r:
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                streams += 1
                problem, answer = sse_problem(r.iter_lines(), stream_errors), ""  # the problem quotes the event
            else:
                r.read()
                problem, answer = None, r.text[:300]
                if r.status_code >= 500:
                    problem = "server error"
                elif r.status_code >= 400 and not well_formed_error(r):
                    problem = "malformed error"
                elif r.status_code == 200:
                    try:
                        r.json()
                    except ValueError:
                        problem = "200 that is not JSON"
        sent += 1
        by_status[r.status_code] += 1
        per_operation[operation][mode][str(r.status_code)] += 1
        if problem:
            shown = json.dumps(json_body) if json_body is not None else repr((content or b"")[:200])
            failures.append(f"{mode} {method} {path} {shown[:1000]} -> {r.status_code} {problem}: {answer!r}")

    tail = explicit_cases(models, max_seq_len)
    target = args.requests - len(tail) - 2 * len(HOSTILE)
    rounds = 0
    while sent < target and rounds < 40:  # new seeds until enough requests went out
        rounds += 1
        before = sent
        for mode, schema in schemas.items():
            for i, op in enumerate(operations(schema)):
                operation = f"{op.method.upper()} {op.path}"

                def from_case(case, operation=operation, mode=mode.value):
                    if sent >= target:
                        return
                    kwargs = case.as_transport_kwargs(base_url=url)
                    data, body = kwargs.get("data"), kwargs.get("json")
                    if mode == "positive":
                        body = whole_ints(body)
                    send(operation, mode, kwargs["method"], kwargs["url"].removeprefix(url), json_body=body,
                         content=data if isinstance(data, (bytes, str)) else None, headers=kwargs.get("headers"),
                         params=kwargs.get("params"))

                strategy = op.as_strategy(generation_mode=mode)
                run = seed(1000 * rounds + i)(settings(max_examples=BATCH, deadline=None, database=None,
                                                       phases=[Phase.explicit, Phase.generate],
                                                       suppress_health_check=list(HealthCheck))(
                    given(strategy)(_calling(from_case))))
                try:
                    run()
                except Unsatisfiable:  # e.g. no invalid request exists for an operation without inputs
                    pass
        if sent == before:
            break
    for path, body in tail:
        send(f"POST {path}", "explicit", "POST", path, json_body=body)
    for body, ctype in HOSTILE:
        for path in ("/v1/completions", "/v1/chat/completions"):
            send(f"POST {path}", "hostile", "POST", path, content=body, headers={"content-type": ctype})
    accepted = by_status[200]
    emit({"benchmark": "api_fuzz", "requests": sent, "by_status": dict(sorted(by_status.items())),
          "accepted_share": round(accepted / max(sent, 1), 3), "streams": streams,
          "stream_error_events": dict(stream_errors),
          "per_operation": {op: {mode: dict(sorted(c.items())) for mode, c in modes.items()}
                            for op, modes in sorted(per_operation.items())},
          "server_errors": sum(v for k, v in by_status.items() if k >= 500), "failures": len(failures),
          "failure_examples": failures[:10], "models": models, "machine": machine()})


if __name__ == "__main__":
    main()
