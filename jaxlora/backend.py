"""`LocalJaxLoRABackend`: one model replica as a plain Python object.

Built from a model (a Hugging Face folder or a GGUF file; default: `demo.default_model`) and an adapter store root, it owns a
`replica.Replica` (engine, scheduler loop, adapter slots, hot-reload watcher) and the tokenizer.
The Ray model deployment wraps exactly this; scripts, notebooks and tests use it directly:

    backend = LocalJaxLoRABackend(fs_root="/data/lora")
    out = backend.generate(messages=[{"role": "user", "content": "Hi"}], adapter="faq", max_tokens=32)
    for chunk in backend.stream(prompt="Once upon", adapter="faq@v0002", temperature=0.7, seed=1): ...

The serving layer tokenizes in its own deployment and calls `submit` with token ids; `generate`
and `stream` add tokenization, chat templates, detokenization and stop strings on top of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from jaxlora.adapter_store import DEFAULT_FS_ROOT, AdapterStore, ResolvedAdapter
from jaxlora.demo import default_model
from jaxlora.engine import EngineConfig, compile_count
from jaxlora.errors import InvalidRequest
from jaxlora.grammar import GrammarCompiler
from jaxlora.hf_checkpoint import model_name
from jaxlora.metrics import peak_memory_bytes
from jaxlora.replica import build_replica
from jaxlora.requests import Finished, RequestHandle, TokenEvent
from jaxlora.sampling import SamplingParams
from jaxlora.tokenizer import TextStream, load_tokenizer, render_chat


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    model: str
    adapter: str | None
    adapter_version: str | None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a streamed completion; the last one has `finish_reason` and `usage`."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    seed: int
    logprobs: list[TokenEvent] | None


class LocalJaxLoRABackend:
    def __init__(
        self,
        model_dir: str | Path | None = None,
        fs_root: str | Path = DEFAULT_FS_ROOT,
        engine_config: EngineConfig = EngineConfig(),
        registered_adapters: dict[str, str] | None = None,
        allowed_roots: Sequence[str | Path] = (),
        poll_interval_s: float = 1.0,
        warm_up: bool = True,
        model_id: str | None = None,
        grammar_timeout_s: float = 10.0,
    ):
        model_dir = Path(model_dir) if model_dir else default_model()
        self.model_id = model_id or model_name(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        tokenizer_eos = () if self.tokenizer.eos_token_id is None else (self.tokenizer.eos_token_id,)
        self.replica = build_replica(model_dir, AdapterStore(fs_root, registered_adapters, tuple(allowed_roots)),
                                     engine_config, eos_token_ids=tokenizer_eos, poll_interval_s=poll_interval_s,
                                     warm_up=warm_up).start()
        self.scheduler = self.replica.scheduler
        self.store = self.replica.store
        self.model_config = self.replica.model_config
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.scheduler.eos_token_ids)
        self.grammar_timeout_s = grammar_timeout_s

    # -- token-level API (what the serving layer uses) --------------------------------------------

    def resolve_adapter(self, adapter: str | None, user: str = "local") -> ResolvedAdapter | None:
        """None (or the base model id) means the base model; else the version new requests get."""
        if not adapter or adapter == self.model_id:
            return None
        return self.replica.versions.current(user, adapter)

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               user: str = "local", weight: float = 1.0, max_rows: int | None = None,
               max_queued: int | None = None, grammar: str | None = None) -> RequestHandle:
        """`user` is the tenant (whose adapters `adapter` names, and whose service fair scheduling
        counts); `weight` its share under fair scheduling, `max_rows`/`max_queued` its tier's limits
        (None: the engine's defaults). `grammar` (`jaxlora.grammar`'s source form) constrains the
        tokens; compiling a new one may take up to `grammar_timeout_s` (call from a worker thread
        when that matters), and one that takes longer is refused."""
        matcher = None if grammar is None else self.grammars.matcher(grammar, self.grammar_timeout_s)
        return self.scheduler.submit(prompt_ids, params, self.resolve_adapter(adapter, user), tenant=user, weight=weight,
                                     max_rows=max_rows, max_queued=max_queued, grammar=matcher)

    def usage(self, fin: Finished) -> Usage:
        return Usage(
            prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
            latency_ms=fin.latency_s * 1000, ttft_ms=None if fin.ttft_s is None else fin.ttft_s * 1000,
            model=self.model_id,
            adapter=fin.adapter.adapter_id if fin.adapter else None,
            adapter_version=fin.adapter.version if fin.adapter else None,
            cached_tokens=fin.cached_tokens,
        )

    # -- text-level API ---------------------------------------------------------------------------

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of prompt or messages", param="messages")
        if messages is not None:
            if not messages:
                raise InvalidRequest("messages is empty", param="messages")
            text = render_chat(self.tokenizer, messages)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def stream(self, prompt: str | None = None, messages: Sequence[dict] | None = None, adapter: str | None = None,
               user: str = "local", stop: Sequence[str] = (), **sampling) -> Iterator[Chunk]:
        """Yields text chunks as tokens are produced; the last chunk carries finish_reason and usage.
        Stopping early (closing the generator) cancels the request and frees its row. One choice, and
        no prompt logprobs (`submit` gives those)."""
        params = SamplingParams(**sampling)
        if params.n != 1 or params.prompt_logprobs is not None:
            raise InvalidRequest("stream and generate give one choice's text: use submit for n > 1 or prompt logprobs",
                                 param="n" if params.n != 1 else "prompt_logprobs")
        handle = self.submit(self.encode(prompt, messages), params, adapter, user)
        text = TextStream(self.tokenizer, stop)
        finished = False
        try:
            for event in handle:
                if isinstance(event, TokenEvent):
                    delta = text.add(event.token_id)
                    yield Chunk(delta, event.token_id, event.logprob, event.top_logprobs)
                    if text.stopped:
                        handle.cancel()
                        for tail in handle:  # wait for the engine to free the row
                            if isinstance(tail, Finished):
                                finished = True
                                yield Chunk("", finish_reason="stop", usage=self.usage(tail), seed=tail.seed)
                        return
                else:
                    finished = True
                    if event.error is not None:
                        raise event.error
                    yield Chunk(text.finish(), finish_reason=event.reason, usage=self.usage(event), seed=event.seed)
        finally:
            if not finished:
                handle.cancel()

    def generate(self, prompt: str | None = None, messages: Sequence[dict] | None = None, adapter: str | None = None,
                 user: str = "local", stop: Sequence[str] = (), **sampling) -> Completion:
        parts, ids, events, last = [], [], [], None
        for chunk in self.stream(prompt, messages, adapter, user, stop, **sampling):
            parts.append(chunk.text)
            if chunk.token_id is not None:
                ids.append(chunk.token_id)
                events.append(TokenEvent(chunk.token_id, chunk.logprob, chunk.top_logprobs))
            last = chunk
        return Completion("".join(parts), ids, last.finish_reason, last.usage, last.seed,
                          events if sampling.get("logprobs") is not None else None)

    # -- operations -------------------------------------------------------------------------------

    def list_adapters(self, user: str = "local"):
        return self.store.list(user)

    @property
    def healthy(self) -> bool:
        return self.scheduler.healthy

    def metrics(self) -> dict:
        out = self.scheduler.snapshot()
        out["adapter_cache"] = dataclasses.asdict(self.replica.slots.stats)
        out["adapter_reload"] = dataclasses.asdict(self.replica.versions.stats)
        out["compilations"] = compile_count()
        out["memory"] = peak_memory_bytes()
        out["decode_kernels"] = self.replica.engine.decode_kernels  # or XLA's forms
        masks, mask_seconds = self.replica.engine.mask_stats
        out["grammar"] = self.grammars.stats() | {"masks": masks, "mask_seconds": mask_seconds}
        return out

    def close(self) -> None:
        self.grammars.close()
        self.replica.close()
