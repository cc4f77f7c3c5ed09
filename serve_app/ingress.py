"""The HTTP ingress: OpenAI's API on FastAPI, in front of the Tokenizer and LoRAModel deployments.

Per request: authenticate (API key -> tenant and tier), validate the body (a 400 naming the field),
encode through the Tokenizer deployment, check the tenant's rate limits with the TenantState deployment
(`serve_app.limits`: a 429 with OpenAI's x-ratelimit-* headers and Retry-After when over one; every
answer of a limited tenant carries the headers), stream token ids from a LoRAModel replica (the adapter's
home replica, placed by the handle's request router `serve_app.routing` from the payload), and turn
them into text on the way out: incremental detokenization, stop strings, logprobs, SSE. The replica's
messages are `serve_app.wire`'s; the response objects come from the endpoint's formatter
(`serve_app.openai_api`); sampling defaults and limits are the engine's, checked there. Each replica
builds its own FastAPI app (`http_app`). Errors keep OpenAI's JSON shape; nothing a client sends can
produce a 500.

Rate limits fail open: when TenantState does not answer within `rate_limit_timeout_s` (restarting,
overloaded, unreachable), the request is served unchecked, without x-ratelimit-* headers, and counted in
`jaxlora_rate_limit_unchecked`. The limits share capacity between tenants over a minute; what protects
a model replica from a burst is still there without them (the engine's fair scheduler, its per-tenant
queue limit, the bounded queues that answer 503), whereas failing closed would turn a brief TenantState
restart into an outage for every tenant.
"""


import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxlora.adapter_format import read_chat_template
from jaxlora.adapter_store import AdapterInfo, AdapterStore
from jaxlora.errors import JaxLoraError
from jaxlora.grammar import checked_grammar
from jaxlora.tokenizer import TextStream, load_tokenizer
from jaxlora.tool_calls import CallEvent, CallParser, call_grammar, detect_family
from serve_app.config import AppArgs
from serve_app.deployments import base_model_id, check_deployment_options, model_dir_of
from serve_app.errors import ApiError, api_error_for
from serve_app.fine_tuning import FineTuningRoutes
from serve_app.keys import KeysFile, Tier
from serve_app.limits import Decision, Limits
from serve_app.metrics import INGRESS_METRICS, build
from serve_app.openai_api import (ChatCompletionRequest, ChatFormat, Choice, CompletionFormat, CompletionRequest,
                                  DetokenizeRequest, StreamOptions, TokenizeRequest, TokenLogprob, now, usage_dict)
from serve_app.usage import SEND_INTERVAL_S, UsageLedger
from serve_app.wire import Done, Failed, Generate, PromptLogprobs, Started, Tokens

log = logging.getLogger("ray.serve")


def http_app(ingress: "Ingress") -> FastAPI:
    """The FastAPI app of one Ingress replica: its routes are `ingress`'s methods, errors keep OpenAI's
    shape, and bodies over the replica's `max_request_bytes` are refused. Serve builds it on the replica,
    after the constructor (`Ingress.__serve_build_asgi_app__`)."""
    app = FastAPI(title="jaxlora", description="OpenAI-compatible multi-tenant LoRA serving")
    # An upload may be as large as a file may be, plus its multipart framing.
    app.add_middleware(BodyLimit, limit=ingress.args.max_request_bytes,
                       overrides={"/v1/files": ingress.args.fine_tuning.max_file_bytes + (64 << 10),
                                  "/v1/models/": ingress.args.fine_tuning.max_adapter_bytes + (64 << 10)})
    app.add_middleware(IngressHeader, replica=ingress.replica)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/health", ingress.health, methods=["GET"])
    app.add_api_route("/v1/models", ingress.models, methods=["GET"])
    app.add_api_route("/v1/usage", ingress.usage, methods=["GET"])
    app.add_api_route("/v1/models/{model_id}", ingress.model, methods=["GET"])
    app.add_api_route("/v1/completions", ingress.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", ingress.chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", ingress.tokenize, methods=["POST"])  # vLLM's paths (lm-evaluation-harness)
    app.add_api_route("/detokenize", ingress.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", ingress.tokenizer_info, methods=["GET"])
    for path, endpoint, methods in ingress.fine_tuning.routes():
        app.add_api_route(path, endpoint, methods=methods)
    return app


async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        message = f"unsupported field {where!r}: this server does not implement it; remove it from the request"
    else:
        message = f"{where}: {first.get('msg', '').removeprefix('Value error, ')}"
    return ApiError(400, message, param=loc[0] if loc else None).response()


async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(e.status_code, str(e.detail), code="http_error").response()


async def _internal_error(_request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error in the ingress")
    return ApiError(500, "internal error", type_="internal_error").response()


class BodyLimit:
    """Refuses request bodies over `limit` bytes (or, for paths under a prefix in `overrides`, its own)
    with 413, whether or not they declare a length."""

    def __init__(self, asgi, limit: int, overrides: dict[str, int] | None = None):
        self.asgi, self.default, self.overrides = asgi, limit, overrides or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        path = scope.get("path", "")
        limit = next((n for prefix, n in self.overrides.items() if path.startswith(prefix)), self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
            return message

        try:
            await self.asgi(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class IngressHeader:
    """Names the ingress replica on every response (`x-jaxlora-ingress`), as `x-jaxlora-replica` names the
    model replica: each ingress replica has its own keys file reader, so which one answered matters."""

    def __init__(self, asgi, replica: str):
        self.asgi, self.header = asgi, (b"x-jaxlora-ingress", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.asgi(scope, receive, named_send)


@dataclasses.dataclass
class Call:
    """One request through the ingress, from its route to its last count: who asked, what, where it
    runs, and its usage so far (what `_observe` counts, settles and records once it is final). A
    completions request may hold a batch of prompts, each submitted as a request of its own."""
    route: str  # the metrics label: "completions" or "chat"
    body: CompletionRequest | ChatCompletionRequest
    received: float = dataclasses.field(default_factory=time.monotonic)
    tenant: str = ""
    tier: Tier = dataclasses.field(default_factory=Tier)
    prompts: list[list[int]] = dataclasses.field(default_factory=list)  # token ids, one list per prompt
    texts: list[str | None] = dataclasses.field(default_factory=list)  # each prompt's text as sent (None: ids)
    grammar: str | None = None  # what the answer must follow (response_format, or the tool call tool_choice forces)
    tool_family: str | None = None  # the answer is parsed for tool calls written in this family's form
    adapter_error: Exception | None = None  # the adapter asked for does not resolve: answered once admitted
    decision: Decision | None = None  # the rate limits' share taken (None: no limits, or unchecked)
    starts: list[Started] = dataclasses.field(default_factory=list)  # the model replicas' answers, one per prompt
    completion_tokens: int = 0  # all choices together
    cached: dict[int, int] = dataclasses.field(default_factory=dict)  # prompt -> its tokens the prefix cache held
    first_token_at: float | None = None
    status: int = 200

    @property
    def start(self) -> Started | None:
        return self.starts[0] if self.starts else None

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens served from the prefix cache, once every prompt has said (None before)."""
        return sum(self.cached.values()) if len(self.cached) == len(self.prompts) else None

    def usage_tags(self, base_model: str) -> dict[str, str]:
        """What its usage is counted under: the tenant, and the adapter (id and version) or the base model."""
        adapter = self.start.adapter if self.start is not None else None
        return {"tenant": self.tenant, "model": base_model if adapter is None else adapter.id,
                "adapter_version": "" if adapter is None else adapter.version}

    def headers(self) -> dict[str, str]:
        """Which model replica served it (its home, for debugging) and the tenant's rate limits."""
        headers = {} if self.start is None else {"x-jaxlora-replica": self.start.replica}
        return headers | ({} if self.decision is None else self.decision.headers())


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one streaming item of the replica becomes on the way out, for one choice (one SSE chunk when
    streamed)."""
    index: int  # the choice's index in the answer (prompt i's choice j: i * n + j)
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # on the choice's last piece only ("tool_calls" when the answer made calls)
    calls: tuple[CallEvent, ...] = ()  # tool calls completed in this piece (their start, then their arguments)


@dataclasses.dataclass
class _ChoiceOut:
    """One choice on its way out: its text (stop strings applied), its tool-call parser, its count."""
    text: TextStream
    parser: CallParser | None
    emitted: int = 0  # characters of its text so far (an echoed prompt's included): the next token's text_offset
    tokens: int = 0  # completion tokens it returned
    started: bool = False  # its echo (when asked for) has gone out
    ended: bool = False


async def _replies(gen: DeploymentResponseGenerator) -> AsyncIterator[tuple[Started | Tokens | Done, ...]]:
    """A model replica's messages for one request, one tuple per streaming item as the replica sent
    them (a request's last Tokens and its Done come as one, and go on to the client as one chunk). The
    one place where a failure on the way becomes the client's error: a `Failed` message (the messages
    before it in its item are yielded first), Serve's back-pressure, or a replica that died (Ray
    replaces it)."""
    answered = False  # until a replica answers, `cancel()` would wait for Serve's routing and re-raise its error
    ended = False  # the replica sent its last message: nothing to cancel (a cancel is a Ray call, per request)
    try:
        async for item in gen:
            answered = True
            msgs = item if isinstance(item, tuple) else (item,)
            ended = isinstance(msgs[-1], (Done, Failed))
            if isinstance(msgs[-1], Failed):
                if msgs[:-1]:
                    yield msgs[:-1]
                raise msgs[-1].error()
            yield msgs
    except ApiError:
        raise
    except BackPressureError:
        raise ApiError(503, "the model deployment is at capacity; retry shortly", type_="overloaded_error",
                       code="overloaded") from None
    except Exception as e:  # the client may retry elsewhere, instead of hanging
        log.warning("model replica failed during a request: %r", e)
        raise ApiError(503, "the model replica serving this request failed; retry the request",
                       type_="overloaded_error", code="replica_failed") from None
    finally:
        if answered and not ended:
            gen.cancel()  # frees the engine row when the client went away or a stop string ended the answer


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


async def _merge(iterators: list[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators as they come, each read by a task of its own; the first
    error is raised, and closing it closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = object()

    async def pump(it: AsyncIterator) -> None:
        try:
            async for x in it:
                queue.put_nowait(x)
        except Exception as e:  # noqa: BLE001 - passed on to the reader
            queue.put_nowait(_Raised(e))
        finally:
            queue.put_nowait(ended)

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    try:
        running = len(tasks)
        while running:
            x = await queue.get()
            if x is ended:
                running -= 1
            elif isinstance(x, _Raised):
                raise x.error
            else:
                yield x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in iterators:
            await it.aclose()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    def __init__(self, tokenizer: DeploymentHandle, model: DeploymentHandle, tenants: DeploymentHandle,
                 job_controller: DeploymentHandle, args: dict):
        self.args = AppArgs(**args)
        check_deployment_options("Ingress", self.args)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.tokenizer_handle = tokenizer
        self.model_handle = model
        self.tenants = tenants
        self.tokenizer = load_tokenizer(model_dir_of(self.args))
        self.base_model = base_model_id(self.args)
        self.started_at = now()
        self.store = AdapterStore(self.args.fs_root, self.args.registered_adapters, tuple(self.args.allowed_roots))
        self.keys = KeysFile(self.args.api_keys_file) if self.args.auth else None
        self.limits = Limits(self.args.requests_per_minute, self.args.tokens_per_minute)  # a tier may override them
        self.metrics = build(INGRESS_METRICS)
        self.unsent_usage, self._usage_timer = UsageLedger(), None  # counted here, not yet in TenantState
        self.job_controller = job_controller  # in the graph so Serve runs it; jobs are on the filesystem
        self.fine_tuning = FineTuningRoutes(self.args, self._tenant)
        # how this model writes tool calls (the app's choice, else what its chat template asks for)
        self.tool_family = (detect_family(self.tokenizer.chat_template) if self.args.tool_parser == "auto"
                            else self.args.tool_parser)
        self.special_ids = {t: i for t, i in zip(self.tokenizer.all_special_tokens, self.tokenizer.all_special_ids)}
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        # adapter version folder -> its chat template or None (a version's files never change)
        self._templates = functools.lru_cache(maxsize=1024)(read_chat_template)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self)

    # -- helpers ----------------------------------------------------------------------------------

    def _tenant(self, request: Request) -> tuple[str, Tier]:
        """The caller's tenant and tier (one look at the keys file); without auth everyone is "local"."""
        if self.keys is None:
            return "local", Tier()
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        found = self.keys.lookup(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if found is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type_="authentication_error", code="invalid_api_key")
        return found

    def _count(self, route: str, status: int, tenant: str = "", model: str = "") -> None:
        """Counts an answered request. One refused before a replica accepted it is counted with neither
        tenant nor model: a model name a client made up must not become a series (serve_app.metrics)."""
        self.metrics["jaxlora_requests"].inc(tags={"tenant": tenant, "model": model, "route": route, "status": str(status)})

    async def _admit(self, call: Call) -> Decision | None:
        """Takes the request's share of the tenant's rate limits, or raises their 429. None: the tenant
        has no limits, or TenantState did not answer in time and the request goes unchecked (fail open,
        see the module docstring)."""
        limits = self.limits.override(call.tier.requests_per_minute, call.tier.tokens_per_minute)
        if not limits:
            return None
        # Each choice of each prompt may generate max_tokens (without it, the rest of the context): reserve that.
        limit = call.body.token_limit()
        max_tokens = call.body.n * sum(self.args.engine.default_max_tokens(len(p)) if limit is None else limit
                                       for p in call.prompts)
        pending = self.tenants.admit.remote(call.tenant, limits, call.prompt_tokens, max_tokens, len(call.prompts))
        try:
            decision = await asyncio.wait_for(pending, self.args.rate_limit_timeout_s)
        except Exception as e:  # slow or unreachable: serve unchecked rather than refuse everyone
            pending.cancel()
            log.warning("rate limits of %r not checked, TenantState did not answer: %r", call.tenant, e)
            self.metrics["jaxlora_rate_limit_unchecked"].inc(tags={"tenant": call.tenant})
            return None
        if not decision.admitted:
            raise decision.error()
        return decision

    def _settle(self, call: Call, used: int) -> None:
        """Gives back what the request reserved of its tenant's tokens but did not use."""
        if call.decision is not None and call.decision.reserved:  # not awaited: accounting never holds up an answer
            self.tenants.settle.remote(call.tenant, call.decision.reserved, used)

    async def _submit(self, call: Call) -> list[AsyncIterator[tuple[PromptLogprobs | Tokens | Done, ...]]]:
        """Checks the rate limits, then submits each prompt to a model replica: sets the call's
        `decision` and `starts`, and returns each prompt's replica messages to come. The prompts after
        the first are pinned to the adapter version it got, so a batch is served by one version even
        across a reload. One at a time, each accepted before the next is sent: Serve's router keeps the
        calls it is placing by their parent request's id, which a request's calls share, so calls
        placed at once collide and one is never placed (Ray 2.60). An ApiError if any is refused (the
        others are cancelled; with the limits' headers once past them)."""
        call.decision = await self._admit(call)
        body = call.body
        adapter = None if body.model == self.base_model else body.model
        sampling = body.sampling_params()
        opened = []

        def submit(prompt: list[int], version: str | None = None):
            # The handle's router (serve_app.routing) reads the tenant and adapter from the Generate.
            opened.append(_replies(self.model_handle.options(stream=True).generate.remote(
                Generate(tuple(prompt), sampling, adapter, call.tenant, call.tier.weight, call.tier.max_rows,
                         call.tier.max_queued, call.grammar, version))))
            return opened[-1]

        try:
            if call.adapter_error is not None:  # a deleted adapter is 404 at once (replicas notice within a poll)
                raise api_error_for(call.adapter_error)
            version = None
            for prompt in call.prompts:
                call.starts.append((await anext(submit(prompt, version)))[0])
                version = None if call.start.adapter is None else call.start.adapter.version
            return opened
        except BaseException as e:  # refused, or the client left, before it ran: nothing used
            self._settle(call, 0)
            for replies in opened:  # cancels those a replica accepted
                await replies.aclose()
            if isinstance(e, ApiError) and call.decision is not None:
                raise e.with_headers(call.decision.headers()) from None
            raise

    def _pieces(self, call: Call, streams: list[AsyncIterator]) -> AsyncIterator[Piece]:
        """Every choice's pieces: one prompt's in the order its replica sent them, several prompts'
        as they come."""
        if len(streams) == 1:
            return self._prompt_pieces(call, 0, streams[0])
        return _merge([self._prompt_pieces(call, i, replies) for i, replies in enumerate(streams)])

    async def _prompt_pieces(self, call: Call, prompt: int, replies: AsyncIterator[tuple]) -> AsyncIterator[Piece]:
        """One prompt's pieces, one per choice and streaming item of the replica (the finish reason on
        a choice's last), keeping the call's usage current: a choice's tokens of one item leave as one
        piece (one SSE chunk), which keeps per-chunk costs in the ingress, the proxy and the client off
        the per-token path. With echo a choice opens with its prompt (and, with logprobs, the prompt
        tokens'); a choice that met a stop string ignores the rest of its tokens, and the prompt's
        request is cancelled once every choice has ended."""
        body, n = call.body, call.body.n
        logprobs = body.top_logprob_count() is not None
        echo = isinstance(body, CompletionRequest) and body.echo
        prompt_only = isinstance(body, CompletionRequest) and body.prompt_only()
        outs: dict[int, _ChoiceOut] = {}
        prompt_lps: PromptLogprobs | None = None

        def out(choice: int) -> _ChoiceOut:
            if choice not in outs:
                parser = None if call.tool_family is None else CallParser(call.tool_family)
                outs[choice] = _ChoiceOut(TextStream(self.tokenizer, body.stop_strings()), parser)
            return outs[choice]

        def piece(choice: int, o: _ChoiceOut, deltas: list[str], tokens: list[TokenLogprob], reason: str | None) -> Piece:
            index = prompt * n + choice
            if o.parser is None:
                return Piece(index, "".join(deltas), tokens, reason)
            events = o.parser.feed("".join(deltas)) + (o.parser.finish() if reason is not None else [])
            if o.parser.calls and reason == "stop":
                reason = "tool_calls"
            return Piece(index, "".join(e.content for e in events if e.index < 0), tokens, reason,
                         tuple(e for e in events if e.index >= 0))

        try:
            async for item in replies:
                call.first_token_at = call.first_token_at or time.monotonic()
                pending: dict[int, tuple[list[str], list[TokenLogprob], list[str | None]]] = {}
                for msg in item:
                    if isinstance(msg, PromptLogprobs):
                        prompt_lps = msg
                        continue
                    o = out(msg.choice)
                    if o.ended:
                        continue
                    deltas, tokens, reason = pending.setdefault(msg.choice, ([], [], [None]))
                    if not o.started:
                        o.started = True
                        if echo:
                            deltas.append(self._echo(call, prompt, prompt_lps, tokens if logprobs else None))
                            o.emitted = len(deltas[-1])
                    if isinstance(msg, Done):
                        deltas.append(o.text.finish())
                        counted = 0 if prompt_only else msg.completion_tokens  # the replica's count is final
                        call.completion_tokens += counted - o.tokens
                        o.tokens, o.ended, reason[0] = counted, True, msg.reason
                        continue
                    if msg.cached_tokens is not None:
                        call.cached[prompt] = msg.cached_tokens
                    if prompt_only:  # the one token the engine made is not part of the answer
                        continue
                    for token_id, lp, top in zip(msg.ids, msg.logprobs, msg.top_logprobs):
                        call.completion_tokens += 1
                        o.tokens += 1
                        delta = o.text.add(token_id)
                        if logprobs:
                            tokens.append(self._token_logprob(token_id, lp, top, o.emitted))
                        o.emitted += len(delta)
                        deltas.append(delta)
                        if o.text.stopped:  # ended here: the replica's count never comes
                            o.ended, reason[0] = True, "stop"
                            break
                for choice, (deltas, tokens, reason) in pending.items():
                    if reason[0] is not None or any(deltas) or tokens:
                        yield piece(choice, outs[choice], deltas, tokens, reason[0])
                if len(outs) == n and all(o.ended for o in outs.values()):
                    return
        finally:
            await replies.aclose()  # cancels the request when it stopped early (stop strings, a client gone)

    def _echo(self, call: Call, prompt: int, prompt_lps: PromptLogprobs | None, tokens: list[TokenLogprob] | None) -> str:
        """The text a choice opens with under echo: the prompt as sent (its ids decoded if it was ids).
        With `tokens` (logprobs asked for), each prompt token's entry is appended to it: its text, the
        logprob of it given the tokens before (None for the first) and the top alternatives, offsets
        counted through the tokens' texts from 0."""
        ids = call.prompts[prompt]
        text = call.texts[prompt] if call.texts[prompt] is not None else self.tokenizer.decode(ids, skip_special_tokens=False)
        if tokens is not None and prompt_lps is not None:
            offset = 0
            for i, token_id in enumerate(ids):
                if i == 0:
                    entry = TokenLogprob(self.token_text(token_id), None, None, 0)
                else:
                    entry = self._token_logprob(token_id, prompt_lps.logprobs[i - 1], prompt_lps.top_logprobs[i - 1], offset)
                tokens.append(entry)
                offset += len(entry.token)
        return text

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)  # each token alone, as logprobs show it

    def _token_logprob(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...], offset: int) -> TokenLogprob:
        return TokenLogprob(self.token_text(token_id), logprob, tuple((self.token_text(t), t_logprob) for t, t_logprob in top),
                            offset)

    # -- routes -----------------------------------------------------------------------------------

    async def health(self) -> dict:
        """200 while the deployments a request needs each have a running replica (Serve's view, which
        its health checks keep current); 503 naming the one that has none, so a load balancer stops
        sending traffic to an app whose model replicas are all dead or restarting."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(serve.get_replica_context().app_name)
        running, down = {}, []
        for name in ("Tokenizer", "LoRAModel", "TenantState"):
            deployment = app.deployments.get(name) if app else None
            states = dict(deployment.replica_states) if deployment else {}
            running[name] = states.get("RUNNING", 0)
            if not running[name]:
                down.append(f"{name} has no running replica ({', '.join(f'{k}: {v}' for k, v in states.items()) or 'none'})")
        if down:
            raise ApiError(503, "not ready: " + "; ".join(down), type_="overloaded_error", code="unhealthy")
        return {"status": "ok", "running_replicas": running}

    def _model_card(self, model_id: str, owner: str, created: int, **extra) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": owner, "root": self.base_model,
                "max_model_len": self.args.engine.max_seq_len, **extra}

    def _base_card(self) -> dict:
        return self._model_card(self.base_model, "jaxlora", self.started_at)

    def _adapter_card(self, a: AdapterInfo) -> dict:
        return self._model_card(a.adapter_id, a.owner, a.created, parent=self.base_model, versions=list(a.versions),
                                latest_version=a.latest)

    async def usage(self, request: Request) -> dict:
        """The calling tenant's own requests and tokens since the app started (an extension): all that
        this replica answered, and what other ingress replicas answered up to `SEND_INTERVAL_S` ago."""
        user, _ = self._tenant(request)
        if (sent := self._send_usage()) is not None:
            await sent
        return await self.tenants.totals.remote(user)

    def _send_usage(self):
        """Sends TenantState what this replica counted since it last did, in one call (None: nothing
        to send). The call is returned, to await when the caller needs it arrived."""
        if self._usage_timer is not None:
            self._usage_timer.cancel()
            self._usage_timer = None
        rows = self.unsent_usage.rows()
        if not rows:
            return None
        self.unsent_usage = UsageLedger()
        return self.tenants.record.remote(rows)

    async def __del__(self):
        """Serve calls it on a graceful shutdown: what was counted but not yet sent goes now."""
        if (sent := self._send_usage()) is not None:
            await sent

    async def models(self, request: Request) -> dict:
        user, _ = self._tenant(request)
        return {"object": "list", "data": [self._base_card()] + [self._adapter_card(a) for a in self.store.list(user)]}

    async def model(self, model_id: str, request: Request) -> dict:
        """OpenAI's models.retrieve: the base model, or one of the caller's (or shared) adapters;
        `created` is the publish time of the version `latest` names (or of a pinned `id@v0002`)."""
        user, _ = self._tenant(request)
        if model_id == self.base_model:
            return self._base_card()
        try:
            info = self.store.info(user, model_id)
        except JaxLoraError as e:
            raise api_error_for(e) from None
        return self._adapter_card(info)

    async def completions(self, body: CompletionRequest, request: Request):
        return await self._serve(Call("completions", body), request, CompletionFormat, self._encode_prompt)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self._serve(Call("chat", body), request, ChatFormat, self._encode_chat)

    def _template_of(self, tenant: str, model: str | None) -> str | None:
        """The chat template of `model` (None: the base model): an adapter's own if its version folder
        holds one, else None (the base model's). A JaxLoraError if the adapter does not resolve."""
        if model is None or model == self.base_model:
            return None
        return self._templates(self.store.resolve(tenant, model).path)

    def _chat_template(self, call: Call) -> str | None:
        """`_template_of` the call's model. An adapter that does not resolve (or whose template is
        unreadable) is the call's `adapter_error`, answered once the request is admitted, like any
        refusal of a replica."""
        try:
            return self._template_of(call.tenant, call.body.model)
        except JaxLoraError as e:
            call.adapter_error = e
            return None

    async def tokenize(self, body: TokenizeRequest, request: Request) -> dict:
        """vLLM's /tokenize: the token ids a completion or chat request with this prompt or these
        messages would send to the model (the model's chat template, an adapter's own where it has one)."""
        tenant, _ = self._tenant(request)
        try:
            body.check()
            template = self._template_of(tenant, body.model)
        except JaxLoraError as e:
            raise api_error_for(e) from None
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            (ids,) = await self.tokenizer_handle.encode_prompts.remote([body.prompt], add_special)
        else:
            ids = await self.tokenizer_handle.encode_chat.remote(
                [m.for_template() for m in body.messages], [t.model_dump(exclude_none=True) for t in body.tools or []],
                template, body.add_generation_prompt, bool(body.add_special_tokens))
        return {"count": len(ids), "max_model_len": self.args.engine.max_seq_len, "tokens": ids,
                "token_strs": [self.token_text(t) for t in ids] if body.return_token_strs else None}

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> dict:
        """vLLM's /detokenize: the text of token ids (special tokens included)."""
        tenant, _ = self._tenant(request)
        try:
            self._template_of(tenant, body.model)  # the model must be one the caller may use
        except JaxLoraError as e:
            raise api_error_for(e) from None
        vocab = len(self.tokenizer)
        if past := [t for t in body.tokens if t >= vocab]:
            raise ApiError(400, f"tokens: id {past[0]} is past this model's vocabulary (ids 0 to {vocab - 1})",
                           param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    async def tokenizer_info(self, request: Request, model: str | None = None) -> dict:
        """vLLM's /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads): the tokenizer's
        class, special tokens and chat template (`model` an adapter with its own: that one)."""
        tenant, _ = self._tenant(request)
        try:
            template = self._template_of(tenant, model)
        except JaxLoraError as e:
            raise api_error_for(e) from None
        tok = self.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": template or tok.chat_template,
                "model_max_length": self.args.engine.max_seq_len, "vocab_size": len(tok)}

    def _tool_family(self, template: str | None) -> str:
        """How tool calls are written: the app's `tool_parser`, else what the (adapter's) template asks for."""
        if template is None or self.args.tool_parser != "auto":
            return self.tool_family
        return detect_family(template)

    async def _encode_prompt(self, call: Call, template: str | None = None) -> None:
        """The call's prompts as token ids (texts through the Tokenizer deployment, in one call) and,
        for echo, their texts as sent."""
        prompts = call.body.prompts()
        if len(prompts) > self.args.max_prompts:
            raise ApiError(400, f"prompt: {len(prompts)} prompts in one request, over this server's max_prompts of "
                           f"{self.args.max_prompts}; send them in several requests", param="prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self.tokenizer_handle.encode_prompts.remote(texts) if texts else [])
        call.prompts = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        call.texts = [p if isinstance(p, str) else None for p in prompts]

    async def _encode_chat(self, call: Call, template: str | None = None) -> None:
        body = call.body
        call.prompts = [await self.tokenizer_handle.encode_chat.remote([m.for_template() for m in body.messages],
                                                                       body.tool_dicts(), template)]
        call.texts = [None]

    def _check_prompts(self, call: Call) -> None:
        """Each prompt fits the engine (`EngineConfig.check_request`), all of them before any is submitted."""
        many = len(call.prompts) > 1
        for i, p in enumerate(call.prompts):
            try:
                self.args.engine.check_request(len(p), call.body.token_limit(), call.body.n,
                                               f"prompt {i} of {len(call.prompts)}" if many else "prompt")
            except JaxLoraError as e:
                raise api_error_for(e) from None

    async def _serve(self, call: Call, request: Request, format_class: type[CompletionFormat] | type[ChatFormat],
                     encode: Callable[..., Awaitable[None]]):
        """The one path of completions and chat, which differ in how the prompts are encoded and in the
        format of the answer: authenticate, encode, admit and submit, then answer whole or streamed."""
        try:
            call.tenant, call.tier = self._tenant(request)
            try:
                template = self._chat_template(call)
                call.body.check()
                call.grammar = call.body.grammar()
                if isinstance(call.body, ChatCompletionRequest) and call.body.calls_tools():
                    call.tool_family = self._tool_family(template)
                    forced = call.body.forced_tools()
                    if forced:
                        parallel = call.body.parallel_tool_calls and call.body.tool_choice == "required"
                        call.grammar = checked_grammar(call_grammar(self.tool_family, forced, parallel, self.special_ids),
                                                       "tools")
            except JaxLoraError as e:
                raise api_error_for(e) from None
            await encode(call, template)
            self._check_prompts(call)
            replies = await self._submit(call)
        except ApiError as e:
            self._count(call.route, e.status)
            raise
        fmt = format_class(call.body.model, call.start.adapter, self.base_model)
        pieces = self._pieces(call, replies)
        if call.body.stream:
            return StreamingResponse(self._stream(call, fmt, pieces), media_type="text/event-stream",
                                     headers=call.headers())
        logprobs = call.body.top_logprob_count() is not None
        choices = [Choice(i, logprobs=[] if logprobs else None) for i in range(len(call.prompts) * call.body.n)]
        parts: list[list[str]] = [[] for _ in choices]
        try:
            async for piece in pieces:
                choice = choices[piece.index]
                parts[piece.index].append(piece.text)
                if logprobs:
                    choice.logprobs.extend(piece.logprobs)
                choice.calls.extend(e.call for e in piece.calls if e.call is not None)
                choice.finish_reason = piece.finish_reason or choice.finish_reason
        except ApiError as e:
            call.status = e.status
            raise e.with_headers(call.headers()) from None
        except asyncio.CancelledError:  # the client went away
            call.status = 499
            raise
        finally:
            self._observe(call)
        for choice, texts in zip(choices, parts):
            choice.text = "".join(texts)
        usage = usage_dict(call.prompt_tokens, call.completion_tokens, call.cached_tokens)
        return JSONResponse(fmt.final(choices, usage), headers=call.headers())

    async def _stream(self, call: Call, fmt: CompletionFormat | ChatFormat, pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
        """The SSE events of a streamed answer, each chunk one choice's (its `index`). The last chunk (the
        last finish reason), the usage chunk and `[DONE]` leave in one write: one message through the
        proxy instead of three."""
        options = call.body.stream_options or StreamOptions()
        tail = ""
        try:
            for index in range(len(call.prompts) * call.body.n):
                if (first := fmt.first_chunk(index)) is not None:
                    yield _sse(first)
            async for piece in pieces:
                if piece.text or piece.logprobs or piece.finish_reason or piece.calls:
                    # vLLM's continuous_usage_stats: the usage so far on every chunk
                    usage = usage_dict(call.prompt_tokens, call.completion_tokens) if options.continuous_usage_stats else None
                    chunk = _sse(fmt.chunk(piece.index, piece.text, piece.logprobs or None, piece.finish_reason, usage,
                                           piece.calls))
                    if piece.finish_reason is None:
                        yield chunk
                    else:  # held back, in case it is the last
                        if tail:
                            yield tail
                        tail = chunk
            if options.include_usage:
                tail += _sse(fmt.usage_chunk(usage_dict(call.prompt_tokens, call.completion_tokens, call.cached_tokens)))
        except ApiError as e:
            call.status = e.status
            tail += _sse(e.body())
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            call.status = 499
            raise
        finally:
            self._observe(call)
        yield tail + _sse("[DONE]")

    def _observe(self, call: Call) -> None:
        """Counts a request a replica accepted, once its usage is final (what the response reported, or what a
        client that left was sent), settles its token reservation to that usage, and, for complete answers,
        records its latencies."""
        tags = call.usage_tags(self.base_model)
        self._count(call.route, call.status, call.tenant, tags["model"])
        # Sent on within SEND_INTERVAL_S, with the other requests ending meanwhile: accounting costs
        # one Ray call per interval, not one per request, and never holds up an answer.
        self.unsent_usage.record(call.tenant, tags["model"], call.prompt_tokens, call.completion_tokens)
        if self._usage_timer is None:
            self._usage_timer = asyncio.get_running_loop().call_later(SEND_INTERVAL_S, self._send_usage)
        self._settle(call, call.prompt_tokens + call.completion_tokens)
        for name, n in (("jaxlora_prompt_tokens", call.prompt_tokens), ("jaxlora_completion_tokens", call.completion_tokens)):
            if n > 0:  # Ray's counters refuse increments of 0
                self.metrics[name].inc(n, tags=tags)
        if call.status != 200 or call.first_token_at is None:
            return
        latency_tags = {"route": call.route, "model": tags["model"]}
        ttft, e2e = call.first_token_at - call.received, time.monotonic() - call.received
        self.metrics["jaxlora_time_to_first_token_seconds"].observe(ttft, tags=latency_tags)
        self.metrics["jaxlora_e2e_request_latency_seconds"].observe(e2e, tags=latency_tags)
        if call.completion_tokens > 1:
            self.metrics["jaxlora_time_per_output_token_seconds"].observe(
                (e2e - ttft) / (call.completion_tokens - 1), tags=latency_tags)
