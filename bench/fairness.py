"""Two tenants on one replica: does a flood from one raise the other's time to first token?

    python -m bench.fairness [--seconds 30] [--rounds 2] [--flood-streams 48] [--stream-interval N]
                             [--stream-messages-per-s R] [--decode-steps N]

The same two-tenant workload at two levels, the policies (`scheduling: fair` and `fifo`) alternating
for `--rounds` rounds, with the engine and streaming options of the shipped serve_config.yaml otherwise
(the default deployment, its engine computing on as many threads as the model replica reserves CPUs;
`--decode-steps`, `--stream-interval` and `--stream-messages-per-s` override them):
  engine  the demo model's scheduler driven in this process (no Ray, no HTTP): what the policy does;
  http    the whole app on a local Ray (auth with one key per tenant), streamed over HTTP, in Ray Serve's
          high-throughput mode as ./dev runs it (RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the environment: without).
Per level and policy:
  1. idle: the light tenant sends short streamed requests one at a time; their TTFT is the baseline;
  2. flood: the flooding tenant keeps `--flood-streams` streams of 128 tokens in flight (a new one
     as soon as one ends) while the light tenant sends a short request every half second.
Over HTTP the two tenants are two client processes, as two tenants are; they share the machine's
cores with the server all the same.
Reports the light tenant's TTFT p50/p99 idle and under the flood, and the tokens/s everything
produced under the flood, per level and policy. Prints one JSON line last. Not a test: figures go in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import httpx

from bench.common import emit, machine, start_local_serve
from serve_app.config import AppArgs

LIGHT_TOKENS, FLOOD_TOKENS = 8, 128

# (tenant, prompt, max_tokens) -> (seconds to the first token, completion tokens) of one request
Send = Callable[[str, str, int], Awaitable[tuple[float, int]]]


def start_app(engine: dict, keys_file: Path, fs: str, streaming: dict) -> str:
    """The app for one policy, on the Serve instance `main` started (`over_http` deletes it after)."""
    from ray import serve

    from jaxlora.tiny_model import ensure_tiny_model
    from serve_app.app import build_app

    model_dir = ensure_tiny_model()
    serve.run(build_app({"fs_root": fs, "auth": True, "api_keys_file": str(keys_file),
                         "engine": engine, **streaming}),
              name="fairness", route_prefix="/")
    return model_dir.name


async def stream_one(http: httpx.AsyncClient, key: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.monotonic(), None, 0
    async with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.monotonic() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.monotonic() - t0), tokens


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": round(1000 * statistics.median(xs), 1), "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1),
            "n": len(xs)}


async def light_idle(send: Send) -> list[float]:
    """The light tenant alone: its TTFTs, one request at a time, once every path is warm."""
    for _ in range(3):
        await send("light", "warm up", LIGHT_TOKENS)
    return [(await send("light", f"light idle {i}", LIGHT_TOKENS))[0] for i in range(20)]


async def light_under_flood(send: Send, start_at: float, stop_at: float) -> tuple[list[float], int]:
    """The light tenant from `start_at` (wall clock: the flood has filled the rows and the queue) to
    `stop_at`, a request every half second: its TTFTs and the tokens it got."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    ttfts, tokens = [], 0
    while time.time() < stop_at:
        ttft, n = await send("light", f"light {len(ttfts)}", LIGHT_TOKENS)
        ttfts.append(ttft)
        tokens += n
        await asyncio.sleep(0.5)
    return ttfts, tokens


class Light(Protocol):
    async def idle(self) -> list[float]: ...

    async def under_flood(self, start_at: float, stop_at: float) -> tuple[list[float], int]: ...


class InProcessLight:
    """The light tenant on the flood's own event loop (the engine level: no client work to share)."""

    def __init__(self, send: Send):
        self.send = send

    async def idle(self) -> list[float]:
        return await light_idle(self.send)

    async def under_flood(self, start_at: float, stop_at: float) -> tuple[list[float], int]:
        return await light_under_flood(self.send, start_at, stop_at)


class LightProcess:
    """The light tenant as its own client process (the http level), as another tenant is: its
    requests never wait for the flooding client's event loop, busy reading 48 streams."""

    def __init__(self, url: str, key: str, model: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_light_process, args=(url, key, model, child), daemon=True)
        self.process.start()

    async def _answer(self):
        answer = await asyncio.to_thread(self.conn.recv)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def idle(self) -> list[float]:
        return await self._answer()

    async def under_flood(self, start_at: float, stop_at: float) -> tuple[list[float], int]:
        self.conn.send((start_at, stop_at))
        return await self._answer()

    def close(self) -> None:
        self.process.join(timeout=10)  # it ends after its last answer; it waits forever if the flood failed
        if self.process.is_alive():
            self.process.terminate()


def _light_process(url: str, key: str, model: str, conn) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            def send(tenant, prompt, n):
                return stream_one(http, key, model, prompt, n)

            conn.send(await light_idle(send))
            conn.send(await light_under_flood(send, *conn.recv()))
    try:
        asyncio.run(run())
    except BaseException as e:  # the parent re-raises it
        conn.send(RuntimeError(f"light tenant: {e!r}"))


async def workload(send: Send, light: Light, seconds: float, flood_streams: int) -> dict:
    """The light tenant idle, then under a flood of `flood_streams` streams for `seconds`."""
    idle = await light.idle()
    t0 = time.time()
    stop_at = t0 + seconds
    produced = 0

    async def flood(i: int) -> None:
        nonlocal produced
        n = 0
        while time.time() < stop_at:
            _, tokens = await send("flood", f"flood {i} {n}", FLOOD_TOKENS)
            produced += tokens  # after the await: `produced += await ...` would read it before
            n += 1

    (light_ttfts, light_tokens), *_ = await asyncio.gather(light.under_flood(t0 + min(5.0, seconds / 4), stop_at),
                                                           *(flood(i) for i in range(flood_streams)))
    wall = time.time() - t0
    return {"idle": idle, "flood": light_ttfts, "tokens": produced + light_tokens, "seconds": wall}


def pooled(runs: list[dict]) -> dict:
    """One policy's rounds together: every TTFT sample, and all tokens over all flood time."""
    return {"light_idle_ttft": _percentiles([x for r in runs for x in r["idle"]]),
            "light_flood_ttft": _percentiles([x for r in runs for x in r["flood"]]),
            "tokens_per_s": round(sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs), 1),
            "tokens_per_s_by_round": [round(r["tokens"] / r["seconds"], 1) for r in runs]}


def shipped_args() -> dict:
    """The `args` of the shipped serve_config.yaml: the default deployment."""
    import yaml

    with open(Path(__file__).resolve().parent.parent / "serve_config.yaml") as f:
        (app,) = yaml.safe_load(f)["applications"]
    return app["args"]


def engine_options(policy: str, args) -> dict:
    """The shipped `engine:` block, with the policy (and `--decode-steps`)."""
    return shipped_args()["engine"] | {"scheduling": policy} | (
        {"decode_steps": args.decode_steps} if args.decode_steps else {})


def streaming_options(args) -> dict:
    """The shipped stream pacing (stream_interval, stream_messages_per_s), with the options given
    (`--stream-messages-per-s 0`: no pacing)."""
    given = {"stream_interval": args.stream_interval, "stream_messages_per_s": args.stream_messages_per_s}
    shipped = shipped_args()
    out = {k: v if v is not None else shipped.get(k) for k, v in given.items()}
    if out["stream_messages_per_s"] == 0:
        out["stream_messages_per_s"] = None
    return {k: v for k, v in out.items() if v is not None}


def over_http(policy: str, args, work: Path, keys_file: Path, keys: dict[str, str], port: int) -> dict:
    from ray import serve

    model = start_app(engine_options(policy, args), keys_file, str(work / "fs"), streaming_options(args))

    url = f"http://127.0.0.1:{port}"
    light = LightProcess(url, keys["light"], model)

    async def run() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            return await workload(lambda tenant, prompt, n: stream_one(http, keys[tenant], model, prompt, n),
                                  light, args.seconds, args.flood_streams)
    try:
        return asyncio.run(run())
    finally:
        light.close()
        serve.delete("fairness")


def in_process(policy: str, args, work: Path) -> dict:
    """The scheduler alone: the same requests straight to `LocalJaxLoRABackend.submit`."""
    from jaxlora.backend import LocalJaxLoRABackend
    from jaxlora.engine import EngineConfig
    from jaxlora.requests import Finished
    from jaxlora.sampling import SamplingParams

    backend = LocalJaxLoRABackend(fs_root=work / "fs", engine_config=EngineConfig(**engine_options(policy, args)))

    async def send(tenant: str, prompt: str, max_tokens: int) -> tuple[float, int]:
        t0, ttft = time.monotonic(), None
        handle = backend.submit(backend.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                       ignore_eos=True), user=tenant)
        async for batch in handle.batches():
            ttft = ttft or time.monotonic() - t0
            if isinstance(batch[-1], Finished):
                return ttft, batch[-1].completion_tokens
    try:
        return asyncio.run(workload(send, InProcessLight(send), args.seconds, args.flood_streams))
    finally:
        backend.close()


def alternate(run: Callable[[str], dict], rounds: int, level: str) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {"fair": [], "fifo": []}
    for i in range(rounds):
        for policy in runs:
            runs[policy].append(r := run(policy))
            print(f"{level} round {i} {policy}: {pooled([r])}", flush=True)
    return {policy: pooled(rs) for policy, rs in runs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30, help="length of the flood phase, per level and policy")
    ap.add_argument("--flood-streams", type=int, default=48)
    ap.add_argument("--stream-interval", type=int, default=None,
                    help="the app's stream_interval (http level; default: serve_config.yaml's)")
    ap.add_argument("--stream-messages-per-s", type=float, default=None,
                    help="the app's stream_messages_per_s (http level; default: serve_config.yaml's; 0: no pacing)")
    ap.add_argument("--decode-steps", type=int, default=None, help="the engine's decode_steps (default: serve_config.yaml's)")
    ap.add_argument("--levels", default="engine,http", help="which of engine,http to run")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fair and fifo alternate this many times per level (the machine's speed drifts by more "
                    "than the 5%% being judged; pooled rounds average it out)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="jaxlora-fairness-"))
    out: dict[str, dict] = {}
    levels = args.levels.split(",")  # http first: Ray forks its processes before this one runs JAX
    if "http" in levels:
        import ray

        from serve_app.keys import add_key

        keys_file = work / "keys.json"
        keys = {tenant: add_key(keys_file, tenant) for tenant in ("flood", "light")}
        from ray import serve

        port = start_local_serve()  # one Serve; each policy's app in turn
        out["http"] = alternate(lambda policy: over_http(policy, args, work, keys_file, keys, port), args.rounds, "http")
        serve.shutdown()
        ray.shutdown()
    threads = AppArgs(**shipped_args()).engine_compute_threads  # as the shipped model replica computes
    if "engine" in levels:
        from jaxlora.cpu_threads import limit_compute_threads

        if threads is not None:
            limit_compute_threads(threads)
        out["engine"] = alternate(lambda policy: in_process(policy, args, work), args.rounds, "engine")
    summary = {}
    for level, by_policy in out.items():
        fair, fifo = by_policy["fair"], by_policy["fifo"]
        summary[level] = {
            "fair_flood_over_idle_p50": round(fair["light_flood_ttft"]["p50_ms"] / fair["light_idle_ttft"]["p50_ms"], 2),
            "fifo_flood_over_idle_p50": round(fifo["light_flood_ttft"]["p50_ms"] / fifo["light_idle_ttft"]["p50_ms"], 2),
            "fair_over_fifo_throughput": round(fair["tokens_per_s"] / fifo["tokens_per_s"], 3)}
    emit({"benchmark": "tenant_fairness", "flood_streams": args.flood_streams, "flood_tokens": FLOOD_TOKENS,
          "light_tokens": LIGHT_TOKENS, "seconds": args.seconds, "rounds": args.rounds, **streaming_options(args),
          "serve_throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
          "engine_compute_threads": threads,
          "engine": engine_options("fair", args) | {"scheduling": "fair|fifo"}, **out,
          "summary": summary, "machine": machine()})


if __name__ == "__main__":
    main()
