"""Adapter homes against Serve's default router: how often the model replicas read an adapter from the
store, how often a request finds its adapter in a device slot, and tokens/s, under Zipf-distributed
traffic over many adapters.

    python -m bench.routing [--adapters 200] [--zipf 1.1] [--requests 2000] [--clients 32]
                            [--max-tokens 16] [--rounds 2] [--routers adapter_home,power_of_two] [--seed 0]

One app at a time on a local Ray, in Ray Serve's high-throughput mode as ./dev runs it: the shipped
serve_config.yaml's arguments with `--model-replicas` (2) model replicas of the demo model, and
`--adapters` random rank-8 PEFT adapters of it published into a temporary store (tenant `local`). The
same request sequence (adapter k of the list drawn with probability proportional to 1 / k^zipf, from
`--seed`) is sent by `--clients` concurrent HTTP clients (completions, not streamed, `--max-tokens`
tokens each), once per router: the app argument `model_router`, `adapter_home` (serve_app.routing)
or `power_of_two` (Serve's default), each on a freshly started app (empty caches), the routers
alternating for `--rounds` rounds. Per router, pooled over the rounds: adapters read from the store
(`adapter_cache.loads` of every replica's `stats`) per 1000 requests, the slot hit rate (admitted
requests whose adapter was already in a device slot), each replica's share of the requests, and the
clients' tokens/s. Prints one JSON line last. Not a test: figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import emit, machine, model_handle, publish_random_adapters, start_local_serve
from bench.fairness import shipped_args

APP = "routing"


def zipf_sequence(adapters: int, exponent: float, n: int, seed: int) -> list[int]:
    """n adapter indexes, index k drawn with probability proportional to 1 / (k + 1)^exponent."""
    return random.Random(seed).choices(range(adapters), [1 / (k + 1) ** exponent for k in range(adapters)], k=n)


def replica_stats(replicas: int) -> dict[str, dict]:
    """Every model replica's `stats`, by replica id."""
    from ray.serve.exceptions import DeploymentUnavailableError

    handle = model_handle(APP)
    deadline = time.monotonic() + 60
    while True:  # until this handle has heard of every replica
        try:
            stats = {s["replica"]: s for s in handle.broadcast("stats").results(timeout_s=60)}
        except DeploymentUnavailableError:  # of none yet
            stats = {}
        if len(stats) == replicas:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(stats)} of {replicas} model replicas answered")
        time.sleep(0.2)


async def drive(url: str, models: list[str], clients: int, max_tokens: int) -> dict:
    """Sends one completion per entry of `models` from `clients` concurrent clients; a 503 is retried
    after its Retry-After."""
    todo = collections.deque(enumerate(models))
    tally = collections.Counter()
    examples: list[str] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while todo:
                i, model = todo.popleft()
                while True:
                    r = await http.post("/v1/completions", json={"model": model, "prompt": f"routing {i}",
                                                                 "max_tokens": max_tokens, "ignore_eos": True,
                                                                 "temperature": 0.0})
                    if r.status_code != 503:
                        break
                    tally["refused_503"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                if r.status_code == 200:
                    tally["tokens"] += r.json()["usage"]["completion_tokens"]
                else:
                    tally["failed"] += 1
                    examples.append(r.text[:200])

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {**tally, "seconds": time.monotonic() - t0, "examples": examples[:3]}


def one_run(router: str, args, fs: Path, names: list[str], sequence: list[int], url: str) -> dict:
    """The request sequence on a fresh app with `router`: the clients' tally and every replica's
    counters over it."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app({**shipped_args(), "fs_root": str(fs), "model_replicas": args.model_replicas,
                         "model_router": router}), name=APP, route_prefix="/")
    try:
        before = replica_stats(args.model_replicas)
        tally = asyncio.run(drive(url, [names[k] for k in sequence], args.clients, args.max_tokens))
        after = replica_stats(args.model_replicas)
    finally:
        serve.delete(APP)

    def delta(replica: str, *path: str) -> int:
        a, b = after[replica], before[replica]
        for p in path:
            a, b = a[p], b[p]
        return a - b

    return {**tally, "replicas": {r: {"requests": delta(r, "requests_finished"),
                                      "loads": delta(r, "adapter_cache", "loads"),
                                      "slot_hits": delta(r, "adapter_cache", "hits"),
                                      "slot_misses": delta(r, "adapter_cache", "misses")} for r in after}}


def shares(run: dict) -> list[float]:
    """Each replica's share of the requests of one run, the largest first."""
    served = [r["requests"] for r in run["replicas"].values()]
    return sorted((round(n / max(1, sum(served)), 3) for n in served), reverse=True)


def pooled(runs: list[dict], requests: int) -> dict:
    """One router's runs together."""
    replicas = [r for run in runs for r in run["replicas"].values()]
    loads, hits, misses = (sum(r[k] for r in replicas) for k in ("loads", "slot_hits", "slot_misses"))
    tokens = [run.get("tokens", 0) for run in runs]
    return {"adapter_loads_per_1000": round(1000 * loads / (requests * len(runs)), 1),
            "slot_hit_rate": round(hits / max(1, hits + misses), 3),
            "tokens_per_s": round(sum(tokens) / sum(run["seconds"] for run in runs), 1),
            "tokens_per_s_by_round": [round(t / run["seconds"], 1) for t, run in zip(tokens, runs)],
            "replica_shares_by_round": [shares(run) for run in runs],
            "refused_503": sum(run.get("refused_503", 0) for run in runs),
            "failed": sum(run.get("failed", 0) for run in runs),
            "examples": [e for run in runs for e in run["examples"]][:3]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent of the adapters' popularity")
    ap.add_argument("--requests", type=int, default=2000, help="per router and round")
    ap.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model-replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="the routers alternate this many times")
    ap.add_argument("--routers", default="adapter_home,power_of_two", help="values of the app argument model_router")
    ap.add_argument("--seed", type=int, default=0, help="of the request sequence (the same for every router)")
    args = ap.parse_args(argv)
    routers = args.routers.split(",")

    import ray
    from ray import serve

    from jaxlora.tiny_model import ensure_tiny_model

    work = Path(tempfile.mkdtemp(prefix="jaxlora-routing-"))
    names = [f"zipf{k:03d}" for k in range(args.adapters)]
    publish_random_adapters(work / "fs", ensure_tiny_model(), names, seed=1000)
    sequence = zipf_sequence(args.adapters, args.zipf, args.requests, args.seed)
    port = start_local_serve()  # one Serve; each router's app in turn
    runs: dict[str, list[dict]] = {router: [] for router in routers}
    for i in range(args.rounds):
        for router in routers:
            runs[router].append(run := one_run(router, args, work / "fs", names, sequence, f"http://127.0.0.1:{port}"))
            print(f"round {i} {router}: {pooled([run], args.requests)}", flush=True)
    serve.shutdown()
    ray.shutdown()
    out = {router: pooled(rs, args.requests) for router, rs in runs.items()}
    summary = {}
    if {"adapter_home", "power_of_two"} <= set(out):
        home, p2 = out["adapter_home"], out["power_of_two"]
        summary = {"adapter_home_over_power_of_two_loads":
                   round(home["adapter_loads_per_1000"] / max(p2["adapter_loads_per_1000"], 0.1), 3),
                   "adapter_home_over_power_of_two_throughput": round(home["tokens_per_s"] / p2["tokens_per_s"], 3)}
    top = collections.Counter(sequence).most_common(1)[0][1] / len(sequence)
    emit({"benchmark": "adapter_routing", "adapters": args.adapters, "zipf": args.zipf, "seed": args.seed,
          "hottest_adapter_share": round(top, 3), "distinct_adapters_asked": len(set(sequence)),
          "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
          "model_replicas": args.model_replicas, "engine": shipped_args()["engine"],
          "serve_throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"), **out, "summary": summary,
          "machine": machine()})


if __name__ == "__main__":
    main()
