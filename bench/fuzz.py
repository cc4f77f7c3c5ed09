"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, every 4xx in OpenAI's shape.

    python -m bench.fuzz [--requests 1000] [--url http://127.0.0.1:8000]

Without --url it starts its own app (as bench.load does). Requests are drawn from schemathesis's
strategies for every operation, half schema-valid (positive) and half deliberately invalid
(negative), spread evenly over the operations, plus the hand-written hostile cases below. Prints
one JSON line last: requests sent, counts by status, and any failures (a 5xx, or a 4xx whose body
is not {"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import argparse
import collections
import json
import socket

import httpx
from hypothesis import HealthCheck, given, seed, settings
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


def well_formed_error(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


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
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.startswith(("/docs", "/redoc"))]
    by_status: collections.Counter = collections.Counter()
    failures: list[str] = []
    sent = 0
    client = httpx.Client(base_url=url, timeout=120)

    def record(label: str, r: httpx.Response) -> None:
        nonlocal sent
        sent += 1
        by_status[r.status_code] += 1
        if r.status_code >= 500 or (r.status_code >= 400 and not well_formed_error(r)):
            failures.append(f"{label} -> {r.status_code}: {r.text[:200]}")

    per = max(1, (args.requests - 2 * len(HOSTILE)) // (2 * len(operations)))
    rounds = 0
    while sent < args.requests - 2 * len(HOSTILE) and rounds < 20:  # new seeds until enough requests went out
        rounds += 1
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                def send(case, label=f"{mode.value} {op.method.upper()} {op.path}"):
                    kwargs = case.as_transport_kwargs(base_url=url)
                    data = kwargs.get("data")
                    r = client.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                                       params=kwargs.get("params"), json=kwargs.get("json"),
                                       content=data if isinstance(data, (bytes, str)) else None)
                    record(f"{label} {str(kwargs.get('json'))[:120]}", r)

                run = seed(rounds)(settings(max_examples=per, deadline=None, database=None,
                                            suppress_health_check=list(HealthCheck))(
                    given(op.as_strategy(generation_mode=mode))(_calling(send))))
                try:
                    run()
                except Unsatisfiable:  # e.g. no invalid request exists for an operation without inputs
                    pass
    for body, ctype in HOSTILE:
        for path in ("/v1/completions", "/v1/chat/completions"):
            record(f"hostile {path} {body[:60]!r}", client.post(path, content=body, headers={"content-type": ctype}))
    emit({"benchmark": "api_fuzz", "requests": sent, "by_status": dict(sorted(by_status.items())),
          "server_errors": sum(v for k, v in by_status.items() if k >= 500), "failures": len(failures),
          "failure_examples": failures[:10], "machine": machine()})


if __name__ == "__main__":
    main()
