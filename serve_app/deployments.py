"""The inner deployments: Tokenizer (CPU, scales out), LoRAModel (one engine per replica) and
TenantState (one replica: the per-tenant state every ingress replica shares: usage, `usage.py`, and
rate-limit buckets, `limits.py`).

LoRAModel is a thin shim over `jaxlora.backend.LocalJaxLoRABackend`: it resolves the adapter for the
caller's tenant, submits the token ids of a `serve_app.wire.Generate`, and streams the engine's
events back as the messages of `serve_app.wire` (Started, Tokens, Done, or Failed). It never sees
text or HTTP; core errors become API errors here, through `serve_app.errors.STATUS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from pathlib import Path

import ray
from ray import serve

from jaxlora.backend import LocalJaxLoRABackend
from jaxlora.compile_cache import use_compilation_cache
from jaxlora.cpu_threads import compute_threads, limit_compute_threads
from jaxlora.demo import default_model
from jaxlora.errors import JaxLoraError
from jaxlora.hf_checkpoint import model_name
from jaxlora.requests import Finished, MessagePacer, PromptLogprobs
from jaxlora.tokenizer import load_tokenizer, render_chat
from serve_app.config import AppArgs, option_mismatches
from serve_app.errors import api_error_for
from serve_app.limits import Decision, Limiter, Limits
from serve_app.metrics import MODEL_METRICS, CounterExport, build
from serve_app.usage import Row, UsageLedger
from serve_app.wire import AdapterVersion, Done, Failed, Generate, Started, Tokens

log = logging.getLogger(__name__)


def check_deployment_options(deployment: str, args: AppArgs) -> None:
    """Refuses to start a replica whose Serve options differ from what `args` set (a `deployments:`
    block overriding build_app), so a setting never silently fails to take effect."""
    config = serve.get_replica_context()._deployment_config
    resources = ray.get_runtime_context().get_assigned_resources()
    running = {"num_replicas": config.num_replicas, "max_ongoing_requests": config.max_ongoing_requests,
               "max_queued_requests": config.max_queued_requests, "ray_actor_options.num_cpus": resources.get("CPU", 0),
               "ray_actor_options.num_gpus": resources.get("GPU", 0),
               "ray_actor_options.runtime_env.env_vars": dict(ray.get_runtime_context().runtime_env.get("env_vars") or {}),
               "request_router_config.request_router_class": config.request_router_config.request_router_class}
    problems = option_mismatches(deployment, args, running)
    if problems:
        raise ValueError("; ".join(problems))


def model_dir_of(args: AppArgs) -> Path:
    """The checkpoint to serve; the default model (fetched on first use into each node's cache) by default."""
    return Path(args.model_dir) if args.model_dir else default_model()


def base_model_id(args: AppArgs) -> str:
    return args.model_id or model_name(model_dir_of(args))


def _messages(batch: list, cached_tokens: int | None) -> list:
    """One batch of a request's engine events as wire messages, in their order per choice: the prompt
    logprobs, then one Tokens per choice (the request's first carries `cached_tokens`), then the Done of
    the choices that ended (or one Failed, last, if one ended in an error)."""
    out, tokens, ends = [], {}, []
    for e in batch:
        if isinstance(e, PromptLogprobs):
            out.append(e)
        elif isinstance(e, Finished):
            ends.append(Done(e.reason, e.completion_tokens, e.choice) if e.error is None
                        else Failed.of(api_error_for(e.error)))
        else:
            tokens.setdefault(e.choice, []).append(e)
    for choice, events in tokens.items():
        out.append(Tokens(tuple(e.token_id for e in events), tuple(e.logprob for e in events),
                          tuple(e.top_logprobs for e in events), cached_tokens, choice))
        cached_tokens = None
    failed = [m for m in ends if isinstance(m, Failed)]
    return out + ([m for m in ends if isinstance(m, Done)] if not failed else failed[:1])


@serve.deployment(name="Tokenizer", ray_actor_options={"num_cpus": 0})
class Tokenizer:
    def __init__(self, args: dict):
        a = AppArgs(**args)
        check_deployment_options("Tokenizer", a)
        self.tokenizer = load_tokenizer(model_dir_of(a))

    def encode_prompts(self, prompts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"] if prompts else []

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None,
                    add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:
        text = render_chat(self.tokenizer, messages, tools, chat_template, add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


@serve.deployment(name="TenantState", num_replicas=1, ray_actor_options={"num_cpus": 0})
class TenantState:
    """The app's one record of per-tenant state that every ingress replica shares: usage totals and
    rate-limit buckets. The methods are async and never await, so each runs to its end on the replica's
    event loop before the next starts (Serve would run sync methods in a thread pool, where two admits
    could both take the last of a bucket)."""

    def __init__(self):
        self.usage = UsageLedger()
        self.limiter = Limiter()

    async def admit(self, tenant: str, limits: Limits, prompt_tokens: int, max_tokens: int, requests: int = 1) -> Decision:
        return self.limiter.admit(tenant, limits, prompt_tokens, max_tokens, requests)

    async def settle(self, tenant: str, reserved: int, used: int) -> None:
        self.limiter.settle(tenant, reserved, used)

    async def record(self, rows: list[Row]) -> None:
        """What an ingress replica counted since it last sent (`UsageLedger.rows`)."""
        self.usage.add(rows)

    async def totals(self, tenant: str) -> dict:
        return self.usage.totals(tenant)


@serve.deployment(name="LoRAModel", ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                  health_check_timeout_s=30)
class LoRAModel:
    def __init__(self, args: dict):
        a = AppArgs(**args)
        check_deployment_options("LoRAModel", a)
        if a.engine_compute_threads is not None:  # before anything starts JAX's backend: its pool is sized then
            limit_compute_threads(a.engine_compute_threads)
        use_compilation_cache()  # a restarted or added replica loads its warm-up's programs
        if a.model_num_gpus > 0:
            import jax

            if jax.default_backend() == "cpu":
                raise RuntimeError(f"model_num_gpus={a.model_num_gpus} but JAX sees no GPU on this node "
                                   f"({jax.devices()}); install the GPU build (pip install -e '.[gpu]') or set model_num_gpus: 0")
        self.backend = LocalJaxLoRABackend(
            model_dir_of(a), a.fs_root, a.engine, a.registered_adapters, a.allowed_roots,
            a.poll_interval_s, model_id=base_model_id(a), grammar_timeout_s=a.grammar_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id  # the id serve_app.routing places by
        self.compute_threads = compute_threads()
        log.info("engine compute threads on CPU: %s (model_num_cpus %s)", self.compute_threads, a.model_num_cpus)
        self.stream_interval = a.stream_interval
        self.pacer = None if a.stream_messages_per_s is None else MessagePacer(a.stream_messages_per_s)
        self._metrics = CounterExport(MODEL_METRICS, build(MODEL_METRICS))
        self._stop = threading.Event()
        threading.Thread(target=self._export_metrics, name="metrics-export", daemon=True).start()

    def _export_metrics(self) -> None:
        while not self._stop.wait(1.0):
            self._metrics.export(self.backend.metrics())

    async def generate(self, request: Generate):
        adapter = request.adapter if request.version is None else f"{request.adapter}@{request.version}"
        submit = functools.partial(self.backend.submit, list(request.prompt_ids), request.sampling, adapter,
                                   request.user, request.weight, request.max_rows, request.max_queued, request.grammar)
        try:
            # a grammar may compile (up to its deadline) off the replica's event loop; the others submit at once
            handle = submit() if request.grammar is None else await asyncio.to_thread(submit)
        except JaxLoraError as e:
            yield Failed.of(api_error_for(e))
            return
        resolved = handle.adapter
        yield Started(self.replica,
                      None if resolved is None else AdapterVersion(resolved.adapter_id, resolved.version))
        open_, first = request.sampling.n, True
        # aclosing: a caller that goes away ends the batches at once, which gives back its share of the pacer
        async with contextlib.aclosing(handle.batches(self.stream_interval, self.pacer)) as batches:
            try:
                async for batch in batches:
                    messages = _messages(batch, handle.cached_tokens if first else None)
                    first = False
                    open_ -= sum(isinstance(m, Done) for m in messages)
                    yield messages[0] if len(messages) == 1 else tuple(messages)  # one streaming item either way
                    if isinstance(messages[-1], Failed):  # the request fails whole
                        break
            finally:
                if open_:  # the caller went away, or a choice failed: free the other choices' rows now
                    handle.cancel()

    def stats(self) -> dict:
        """The engine's metrics snapshot (the numbers serve_app.metrics.MODEL_METRICS exports), the
        threads XLA computes on (`jaxlora.cpu_threads`), and which replica this is (the id `Started`
        names and the router places by)."""
        return self.backend.metrics() | {"compute_threads": self.compute_threads, "replica": self.replica}

    def check_health(self) -> None:
        if not self.backend.healthy:
            raise RuntimeError(f"engine loop is not running: {self.backend.scheduler.error!r}")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "backend"):
            self.backend.close()
