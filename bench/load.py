"""Bounded load test of the serving app on loopback: many concurrent clients, mixed adapters, half
streaming; checks that nothing accepted is lost, duplicated or cut short.

    python -m bench.load [--clients 200] [--seconds 60] [--url http://127.0.0.1:8000]

Without --url it starts its own app (local Ray, the demo model, 4 demo adapters in a temporary
store). Each client loops until the time is up: a random adapter (or the base model), half the
requests streamed, max_tokens 8..32 with ignore_eos, so every accepted request must return
exactly max_tokens tokens; a 503 is counted and retried after its Retry-After. Afterwards it checks
that every engine row is free and compares the model replica's resident memory with its level
before the load. Prints one JSON line last (the figures docs/reliability.md records).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import tempfile
import time

import httpx

from bench.common import emit, machine, model_handle, publish_random_adapters
from jaxlora.fetch import SMOLLM2
from jaxlora.hf_checkpoint import model_name


def start_app(port: int, max_batch_size: int = 16, max_queue: int = 64, max_queued: int = 64):
    import ray
    from ray import serve

    from jaxlora.demo import publish_demo_adapters
    from jaxlora.tiny_model import ensure_tiny_model
    from serve_app.app import build_app

    fs = tempfile.mkdtemp(prefix="jaxlora-load-")
    model_dir = ensure_tiny_model()
    publish_demo_adapters(fs, model_dir)
    publish_random_adapters(fs, model_dir, ["load0", "load1"], seed=50)
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_dir": str(model_dir), "fs_root": fs, "model_max_queued_requests": max_queued,
                         "engine": {"max_batch_size": max_batch_size, "max_seq_len": 128, "prefill_chunk": 16,
                                    "max_queue": max_queue}}),
              name="load", route_prefix="/")
    return model_dir.name, ["demo-concise", "demo-verbose", "load0", "load1"]


def model_stats() -> dict:
    return model_handle("load").stats.remote().result()


async def client_loop(url: str, base: str, adapters: list[str], until: float, rng: random.Random, tally: dict,
                      ids: set) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            n = rng.randint(8, 32)
            stream = rng.random() < 0.5
            body = {"model": rng.choice([base, *adapters]), "prompt": f"load test {rng.random()}", "max_tokens": n,
                    "ignore_eos": True, "temperature": 0.7, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            tally["sent"] += 1
            try:
                if stream:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            await r.aread()
                            await _refused(r, tally)
                            continue
                        usage, rid, errored = None, None, False
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                errored |= "error" in chunk
                                rid = chunk.get("id", rid)
                                usage = chunk.get("usage") or usage
                        _accepted(tally, ids, rid, usage, n, errored)
                else:
                    r = await http.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        await _refused(r, tally)
                        continue
                    j = r.json()
                    _accepted(tally, ids, j["id"], j["usage"], n, False)
            except httpx.HTTPError as e:
                tally["transport_errors"] += 1
                tally["lost"] += 1
                tally["examples"].append(repr(e))


async def _refused(r: httpx.Response, tally: dict) -> None:
    tally[f"refused_{r.status_code}"] += 1
    if r.status_code == 503:
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    else:
        tally["lost"] += 1  # only overload may refuse a well-formed request
        tally["examples"].append(r.text[:200])


def _accepted(tally, ids, rid, usage, n, errored) -> None:
    tally["accepted"] += 1
    if errored or usage is None or usage["completion_tokens"] != n:
        tally["lost"] += 1
        tally["examples"].append(f"{rid}: usage={usage} errored={errored} wanted {n}")
    if rid in ids:
        tally["duplicated"] += 1
    ids.add(rid)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--url", help="an app already running (its model stats are then not read)")
    ap.add_argument("--base", default=model_name(SMOLLM2.filename), help="with --url: the base model id it serves")
    ap.add_argument("--max-batch-size", type=int, default=16, help="engine rows of the app this starts")
    ap.add_argument("--max-queue", type=int, default=64, help="engine queue of the app this starts")
    ap.add_argument("--max-queued", type=int, default=64, help="handle queue (max_queued_requests) of the app")
    args = ap.parse_args(argv)
    if args.url:
        url, base, adapters, own = args.url, args.base, ["demo-concise", "demo-verbose"], False
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base, adapters = start_app(port, args.max_batch_size, args.max_queue, args.max_queued)
        url, own = f"http://127.0.0.1:{port}", True
    for model in [base, *adapters]:  # warm every path once, so "before" is the steady state
        for stream in (False, True):
            httpx.post(f"{url}/v1/completions", timeout=120, json={"model": model, "prompt": "warm", "max_tokens": 8,
                                                                    "stream": stream})
    before = model_stats()["memory"] if own else {}
    tally: dict = collections.defaultdict(int)
    tally["examples"] = []
    ids: set = set()
    until = time.monotonic() + args.seconds

    async def run():
        await asyncio.gather(*(client_loop(url, base, adapters, until, random.Random(i), tally, ids)
                               for i in range(args.clients)))

    t0 = time.monotonic()
    asyncio.run(run())
    wall = time.monotonic() - t0
    after = {}
    if own:
        time.sleep(2)  # let cancelled or finishing rows retire
        stats = model_stats()
        after = stats["memory"]
        tally["engine_rows_busy_after"] = stats["active_rows"]
        tally["engine_queue_after"] = stats["queue_depth"]
    result = {"benchmark": "serve_load", "clients": args.clients, "seconds": round(wall, 1),
              **{k: v for k, v in tally.items() if k != "examples"}, "examples": tally["examples"][:5],
              "replica_rss_before_mb": round(before.get("host_rss_bytes", 0) / 2**20, 1),
              "replica_rss_after_mb": round(after.get("host_rss_bytes", 0) / 2**20, 1), "machine": machine()}
    emit(result)


if __name__ == "__main__":
    main()
