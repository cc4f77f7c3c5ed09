"""The host half of the engine: one sequential loop doing continuous batching.

Each turn of the loop, in order:
  1. drop cancelled requests (waiting ones, and running ones, whose rows free at once);
  2. admit waiting requests into free rows, in the order the policy gives (`fairness.py`: least
     service across tenants, or arrival): pin the adapter's slot, take a row, copy the longest
     cached run of the prompt's leading chunks into it (`prefix_cache.py`); a request whose
     adapter is still being read from disk waits without blocking the others. Under `fair`, with
     every row taken, a decoding row of a tenant far ahead may be swapped out to host memory for a
     tenant far behind (`_preempt`); the swapped request resumes later, in any row, bitwise where
     it was;
  3. prefill: the next chunk of rows still prefilling, oldest first, in calls of up to
     `prefill_batch` rows that share an attention window, until `prefill_tokens_per_turn` is spent;
     when the rows waiting for their prompt outnumber the decoding rows (none decoding included),
     until every prompt is done instead (`_prefill`: the idle-row rule); a row whose prompt is done
     gets its first token and decodes from now on. Complete chunks go into the prefix cache;
  4. run `decode_steps` decode steps for all rows in one device call;
  5. hand each decoding request its new tokens, and retire those that hit EOS, a stop token or
     `max_tokens` (their rows are free for the next turn).
So a long prompt arriving beside more decoding rows than there are prompts in flight is prefilled
a budget a turn between decode calls, and never stalls those rows for longer than that; a burst of
prompts that outnumbers the decoding rows is prefilled at once, and never leaves rows idle.
One thread, no per-stage queues: the order of events is the order of this code. Requests talk to
the loop through `submit`, and read their tokens from (or cancel them through) the `RequestHandle`
it returns (`requests.py`). The device work goes through `EngineApi`.

Errors: a bad request is refused in `submit` (InvalidRequest, Overloaded) before it queues; an
adapter that fails to load fails only its requests; an exception in a device step fails every
request that was running and stops the loop, and `healthy` turns false so the replica is replaced.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from typing import Any, Protocol

import jax
import numpy as np

from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.engine import ChunkKV, EngineConfig, PrefillItem, StepTokens
from jaxlora.errors import EngineDead, InvalidRequest, JaxLoraError, NoFreeSlot, Overloaded, TenantOverLimit
from jaxlora.fairness import TokenCounters
from jaxlora.grammar import Matcher
from jaxlora.lora import LoraStack
from jaxlora.metrics import EngineMetrics
from jaxlora.prefix_cache import PrefixCache
from jaxlora.requests import Finished, PromptLogprobs, Request, RequestHandle, TokenEvent, TokenStream
from jaxlora.sampling import SamplingParams, choice_seed
from jaxlora.slots import BASE_SLOT, SlotCache

log = logging.getLogger(__name__)


class EngineApi(Protocol):
    """What the loop needs of the device engine: `engine.Engine`, or the hand-computable mock the
    scheduler's tests use (`tests/mock_engine.py`). The state and prefix are opaque here."""

    config: EngineConfig
    vocab_size: int

    def init_state(self) -> Any: ...

    kv_cache_bytes: int

    def prefill(self, lora: LoraStack, state: Any, items: list[PrefillItem]) -> tuple[Any, StepTokens, ChunkKV, StepTokens]: ...

    def put_chunk(self, state: Any, kv: ChunkKV, row: int, start: int) -> Any: ...

    def fork(self, state: Any, row: int, prompt: tuple[int, ...], rows: list[int],
             sampling: list[tuple[SamplingParams, int]]) -> Any: ...

    def generate(self, lora: LoraStack, state: Any, grammars: list[Matcher | None] | None = None
                 ) -> tuple[Any, StepTokens]: ...

    def swap_out(self, state: Any, row: int) -> Any: ...

    def swap_in(self, saved: Any, state: Any, row: int, slot: int) -> Any: ...


@dataclasses.dataclass(eq=False)
class _Live:
    """A submitted request's progress. The engine thread owns it; `cancelled` is set by any thread."""

    request: Request
    stream: TokenStream
    adapter_ready: concurrent.futures.Future | None  # the host read of the adapter
    grammar: Matcher | None = None  # what its tokens must follow (advanced by the engine's decode calls)
    choice: int = 0  # which of the request's `n` choices; choice 0 leads: it queues and prefills
    followers: list["_Live"] = dataclasses.field(default_factory=list)  # the leader's other choices
    row: int | None = None  # the decode row it holds while running
    prefilling: bool = False  # it holds a row whose prompt is not all prefilled yet (a follower: not forked yet)
    prefilled: int = 0  # while prefilling: where its next chunk starts
    chunk_keys: list[bytes] = dataclasses.field(default_factory=list)  # its complete chunks' prefix-cache keys
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = dataclasses.field(default_factory=list)
    slot: int = BASE_SLOT  # the adapter slot it pins while running
    generated: int = 0
    saved: Any = None  # while preempted: its row's decode state in host memory (`EngineApi.swap_out`)
    preemptions: int = 0
    placed_at: int = -1  # the decode call count when it last took a row
    first_token_at: float | None = None
    cancelled: bool = False
    done: bool = False


class Scheduler:
    def __init__(self, engine: EngineApi, slots: SlotCache, eos_token_ids: tuple[int, ...] = (), base_model: str = ""):
        self.engine = engine
        self.slots = slots
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = EngineMetrics()
        self.prefix = PrefixCache(engine.config.prefix_cache_bytes, engine.config.prefill_chunk, base_model)
        self.counters = TokenCounters(engine.config.completion_token_weight)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._to_cancel: list[_Live] = []
        self._rows: list[_Live | None] = [None] * engine.config.max_batch_size
        self._prefilling: list[_Live] = []  # rows still prefilling, in the order they took their rows
        self._swapped = 0  # waiting requests that hold a `saved` row (at most max_batch_size)
        self._seed_rng = random.Random()
        self._state = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # -- any thread -------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, adapter: ResolvedAdapter | None = None,
               tenant: str = "", weight: float = 1.0, max_rows: int | None = None,
               max_queued: int | None = None, grammar: Matcher | None = None) -> RequestHandle:
        """Queues a request, or refuses it at once (InvalidRequest, Overloaded, TenantOverLimit,
        EngineDead). `tenant`, its `weight` and its limits decide when the request runs, never what it
        produces; `max_rows` and `max_queued` override the engine's `max_rows_per_tenant` and
        `max_queued_per_tenant` for this tenant (its tier), None keeps them. With a `grammar` (a fresh
        matcher, `grammar.GrammarCompiler.matcher`), every token is drawn from what it allows and the
        request ends with EOS where the grammar is complete. With `params.n` > 1 the request has n
        choices, each its own row (all taken at once) and random stream (`sampling.choice_seed`); the
        prompt is prefilled once, in choice 0's row, and forked into the others (`EngineApi.fork`)."""
        params.validate()
        if grammar is not None and params.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a grammar (response_format or tools): the "
                                 "grammar ends the answer with EOS", param="ignore_eos")
        params = dataclasses.replace(params, max_tokens=self.engine.config.check_request(len(prompt), params.max_tokens,
                                                                                          params.n))
        vocab = self.engine.vocab_size
        if any(not (0 <= t < vocab) for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        past = [t for t, _ in params.logit_bias if t >= vocab]
        if past:
            raise InvalidRequest(f"invalid logit_bias: token id {past[0]} is past this model's vocabulary (ids 0 to {vocab - 1})",
                                 param="logit_bias")
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**63)
        with self._cond:
            if self.error is not None or self._stopping:
                raise EngineDead(f"the engine has stopped: {self.error!r}")
            # max_queue counts requests that must wait: those a free row will take at once do not, nor
            # preempted ones (they were admitted once).
            queued = len(self._waiting) - self._swapped
            if queued >= self.engine.config.max_queue + self.free_rows():
                self.metrics.requests_rejected_overload += 1
                raise Overloaded(f"the server is at capacity ({queued} requests waiting); retry shortly")
            waiting = collections.Counter(r.request.tenant for r in self._waiting if r.saved is None)  # tenant -> queued
            limit_queued = max_queued if max_queued is not None else self.engine.config.max_queued_per_tenant
            if limit_queued is not None and waiting[tenant] >= limit_queued:
                raise TenantOverLimit(f"tenant {tenant!r} already has {limit_queued} requests waiting (its limit); "
                                      "retry when one has started")
            request = Request(tuple(prompt), params, seed, adapter,
                              frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids),
                              time.monotonic(), tenant, weight,
                              max_rows if max_rows is not None else self.engine.config.max_rows_per_tenant)
            req = _Live(request, TokenStream(params.n), None if adapter is None else self.slots.prefetch(adapter), grammar)
            req.followers = [_Live(dataclasses.replace(request, seed=choice_seed(seed, i)), req.stream, req.adapter_ready,
                                   None if grammar is None else grammar.fork(), choice=i, prefilling=True)
                             for i in range(1, params.n)]
            if not waiting[tenant]:
                self.counters.activate(tenant, waiting)
            self._waiting.append(req)
            self.metrics.requests_submitted += 1
            self.metrics.prompt_tokens += len(prompt)
            self._cond.notify_all()
        if req.adapter_ready is not None:
            req.adapter_ready.add_done_callback(lambda _: self._wake())
        return RequestHandle(request, req.stream, lambda: self._cancel(req))

    def _cancel(self, req: _Live) -> None:
        """Cancels the request: every one of its choices."""
        with self._cond:
            for r in (req, *req.followers):
                if not r.cancelled:
                    r.cancelled = True
                    self._to_cancel.append(r)
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    def snapshot(self) -> dict:
        """The metrics plus what is derived from the loop's state now: queue depth and rows in use."""
        return self.metrics.snapshot() | {"queue_depth": len(self._waiting) - self._swapped, "swapped_out": self._swapped,
                                          "active_rows": len(self._rows) - self.free_rows(),
                                          "prefilling_rows": len(self._prefilling),
                                          "kv_cache_bytes": self.engine.kv_cache_bytes,
                                          "prefix_cache": self.prefix.snapshot()}

    def start(self) -> None:
        self._state = self.engine.init_state()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._has_work():
                        self._cond.wait(timeout=0.5)
                    if self._stopping:
                        break
                    cancelled, self._to_cancel = self._to_cancel, []
                for req in cancelled:
                    self._retire(req, "cancelled")
                self._admit()
                self._prefill()
                if self._decoding():
                    self._decode()
        except BaseException as e:  # noqa: BLE001 - every request must hear about it
            log.exception("engine loop failed; failing all requests")
            self.error = e
        finally:
            self._fail_all(self.error or EngineDead("the engine was stopped"))

    def _has_work(self) -> bool:
        if self._to_cancel or any(r is not None for r in self._rows):
            return True
        return bool(self._waiting) and any(self._admissible(r) for r in self._waiting)

    @staticmethod
    def _admissible(req: _Live) -> bool:
        return req.adapter_ready is None or req.adapter_ready.done()

    def _admit(self) -> None:
        """Fills free rows, each with the next request by the policy (`_next`): a preempted one goes
        back where it left off (`_resume`), a new one takes a row to prefill in (`_place`). With
        every row taken, `_preempt` may free one for a tenant far behind."""
        while None in self._rows or self._preempt():
            req = self._next()
            if req is None:
                return
            if req.saved is None and self.free_rows() < 1 + len(req.followers):  # its choices' rows all at once:
                self._put_back(req)  # it keeps its place, and rows freeing accumulate for it
                return
            if req.request.adapter is not None:
                if req.adapter_ready.exception() is not None:  # the adapter failed to load: this request only
                    self._finish(req, "error", req.adapter_ready.exception())
                    continue
                try:
                    req.slot = self.slots.acquire(req.request.adapter)
                except NoFreeSlot:  # it keeps its place; rows finishing free slots
                    self._put_back(req)
                    return
                except JaxLoraError as e:  # e.g. evicted from the host cache and then unreadable
                    self._finish(req, "error", e)
                    continue
            if req.saved is not None:
                self._resume(req)
            else:
                self._place(req)

    def _put_back(self, req: _Live) -> None:
        """`req`, just taken by `_next`, back at the head of the queue, its service given back."""
        with self._cond:
            self._waiting.appendleft(req)
        self.counters.charge_prompt(req.request.tenant, -self._prompt_cost(req), req.request.weight)

    def _take_row(self, req: _Live) -> None:
        req.row = self._rows.index(None)
        self._rows[req.row] = req
        req.placed_at = self.metrics.decode_calls

    def _place(self, req: _Live) -> None:
        """A new request into a free row (its other choices each into one more, where they wait for
        its prompt), with the longest run of its prompt's leading chunks that the prefix cache holds
        for its adapter version copied in. The last chunk is always left to prefill: its logits give
        the first token. A request that asks for its prompt's log-probabilities prefills every chunk
        (the cache keeps keys and values, not what the chunk's logits said)."""
        self._take_row(req)
        req.prefilling = True
        for f in req.followers:
            self._take_row(f)
            if f.request.adapter is not None:
                f.slot = self.slots.acquire(f.request.adapter)  # the leader's slot, pinned once more
        if self.prefix.enabled:
            prompt, C = req.request.prompt, self.engine.config.prefill_chunk
            req.chunk_keys = self.prefix.chunk_keys(prompt)
            usable = (len(prompt) - 1) // C
            if req.request.params.prompt_logprobs is not None:
                usable = 0
            hits = self.prefix.lookup(self._adapter_key(req), req.chunk_keys[:usable]) if usable else []
            for i, kv in enumerate(hits):
                self._state = self.engine.put_chunk(self._state, kv, req.row, i * C)
            req.prefilled = req.stream.cached_tokens = len(hits) * C  # the stream tells its consumer
        self._prefilling.append(req)

    @staticmethod
    def _adapter_key(req: _Live):
        return None if req.request.adapter is None else req.request.adapter.key

    def _decoding(self) -> list[_Live]:
        """The requests whose rows decode: they hold a row and their prompt is all prefilled."""
        return [r for r in self._rows if r is not None and not r.prefilling]

    def _prefill(self) -> None:
        """Prefills the next chunk of rows still prefilling, oldest first: each call takes the oldest
        one and up to `prefill_batch` - 1 more whose chunk has the same window.

        How much a turn prefills (the idle-row rule): when the rows waiting for their prompt
        outnumber the rows decoding (nothing decoding included), every prompt is prefilled to its
        end before the next decode call, so no row sits through decode calls idle; the few streams
        decoding wait once, for all of it. Otherwise the decoding rows are the majority and the
        turn's calls stop once `prefill_tokens_per_turn` is spent (one call when it is None), so a
        long prompt delays them by at most that much a turn. Decided once a turn, before any call."""
        config = self.engine.config
        P, C = config.prefill_batch, config.prefill_chunk
        budget = config.prefill_tokens_per_turn or P * C
        fill = len(self._prefilling) > len(self._decoding())
        spent = 0
        while self._prefilling:
            if spent >= budget and not fill:
                return
            window = config.window(self._prefilling[0].prefilled)
            group = [r for r in self._prefilling if config.window(r.prefilled) == window][:P]
            items = [PrefillItem(r.row, r.request.prompt, r.prefilled, r.slot, r.request.params, r.request.seed, r.grammar,
                                 r.request.params.prompt_logprobs is not None) for r in group]
            self._state, first, written, prompt = self.engine.prefill(self.slots.stack, self._state, items)
            spent += P * C
            self.metrics.record_prefill(len(group) * C)
            self._keep_chunks(group, written)
            first = jax.device_get(first)
            if any(i.prompt_logprobs for i in items):
                self._keep_prompt_logprobs(group, jax.device_get(prompt))
            for p, req in enumerate(group):
                req.prefilled += C
                if req.prefilled >= len(req.request.prompt):
                    req.prefilling = False
                    self._prefilling.remove(req)
                    self._prompt_done(req)
                    self._accept(req, int(first.token[p]), float(first.logprob[p]), first.top_ids[p], first.top_logprobs[p])

    def _keep_prompt_logprobs(self, group: list[_Live], prompt: StepTokens) -> None:
        """The prompt tokens' log-probabilities this call computed, for the requests that asked: at
        [p, c], of the token at position prefilled + c + 1 while that is in the prompt."""
        for p, r in enumerate(group):
            k = r.request.params.prompt_logprobs
            if k is None:
                continue
            for c in range(min(self.engine.config.prefill_chunk, len(r.request.prompt) - 1 - r.prefilled)):
                r.prompt_logprobs.append((float(prompt.logprob[p, c]),
                                          tuple((int(prompt.top_ids[p, c, i]), float(prompt.top_logprobs[p, c, i]))
                                                for i in range(k))))

    def _prompt_done(self, req: _Live) -> None:
        """The prompt of `req` is all prefilled: its log-probabilities go out (when asked for), and its
        other choices get its row's prompt (`EngineApi.fork`) and decode from the next call on."""
        if req.request.params.prompt_logprobs is not None:
            req.stream.put(PromptLogprobs(tuple(lp for lp, _ in req.prompt_logprobs),
                                          tuple(top for _, top in req.prompt_logprobs)))
            req.prompt_logprobs = []
        forks = [f for f in req.followers if not f.done]
        if forks:
            self._state = self.engine.fork(self._state, req.row, req.request.prompt, [f.row for f in forks],
                                           [(f.request.params, f.request.seed) for f in forks])
            for f in forks:
                f.prefilling = False

    def _keep_chunks(self, group: list[_Live], written: ChunkKV) -> None:
        """Puts the chunks of `group` this call completed, and the cache lacks, into the prefix cache."""
        if not self.prefix.enabled:
            return
        C = self.engine.config.prefill_chunk
        new = [(p, r) for p, r in enumerate(group) if r.prefilled + C <= len(r.request.prompt)
               and (self._adapter_key(r), r.chunk_keys[r.prefilled // C]) not in self.prefix]
        if not new:
            return
        written = jax.device_get(written)
        for p, r in new:
            self.prefix.put(self._adapter_key(r), r.chunk_keys[r.prefilled // C],
                            ChunkKV(k=tuple(np.array(a[p]) for a in written.k), v=tuple(np.array(a[p]) for a in written.v)))

    def _resume(self, req: _Live) -> None:
        self._take_row(req)
        self._state = self.engine.swap_in(req.saved, self._state, req.row, req.slot)
        req.saved = None
        self._swapped -= 1

    @staticmethod
    def _prompt_cost(req: _Live) -> int:
        """Prompt tokens charged when `req` is admitted: none on resuming, it was prefilled before."""
        return 0 if req.saved is not None else len(req.request.prompt)

    def _preempt(self) -> bool:
        """Frees a row when every row is taken and the least-served waiting tenant is further behind a
        running tenant than its next request costs (a smaller gap is left to the next row that frees,
        so tenants with about equal service do not swap rows back and forth): the victim is the
        most-served running tenant's latest request that has been preempted fewer than
        `max_preemptions` times and has decoded since it took its row (a row is never swapped out
        before it made progress). Its row goes to host memory
        (`EngineApi.swap_out`) and comes back, in any free row, when the policy picks it again.
        At most `max_batch_size` requests are swapped out at once: one more KV cache, in host memory."""
        config = self.engine.config
        if config.scheduling != "fair" or not config.max_preemptions or self._swapped >= config.max_batch_size:
            return False
        with self._cond:
            heads = self._heads(r for r in self._waiting if not r.cancelled and self._admissible(r))
        if not heads:
            return False
        waiter = heads[self.counters.least_served(heads)]
        counter = self.counters.counters.get
        victims = [r for r in self._rows if r is not None and not r.prefilling and r.request.tenant != waiter.request.tenant
                   and r.preemptions < config.max_preemptions and r.placed_at < self.metrics.decode_calls]
        if not victims:
            return False
        most_served = max((r.request.tenant for r in victims), key=lambda t: counter(t, 0.0))
        cost = (self._prompt_cost(waiter) + self.counters.completion_weight
                * (waiter.request.params.max_tokens - waiter.generated)) / waiter.request.weight
        if counter(most_served, 0.0) - counter(waiter.request.tenant, 0.0) <= cost:
            return False
        adapter = waiter.request.adapter  # a row freed for a request that then finds no adapter slot would idle
        victims = [r for r in victims if r.request.tenant == most_served
                   and (adapter is None or self.slots.can_acquire(adapter, r.slot))]
        if not victims:
            return False
        victim = max(victims, key=lambda r: r.request.submitted_at)
        victim.saved = self.engine.swap_out(self._state, victim.row)
        self._rows[victim.row], victim.row = None, None
        if victim.request.adapter is not None:
            self.slots.release(victim.slot)
        victim.preemptions += 1
        self._swapped += 1
        self.metrics.preemptions += 1
        with self._cond:  # back in arrival order: within its tenant, it is next again
            at = next((i for i, r in enumerate(self._waiting) if r.request.submitted_at > victim.request.submitted_at),
                      len(self._waiting))
            self._waiting.insert(at, victim)
        return True

    def _next(self) -> _Live | None:
        """The waiting request to start now by the scheduling policy (`_pick`), out of the queue with
        its prompt charged; those whose adapter is still loading keep their place but do not hold up
        the others."""
        with self._cond:
            candidates = [r for r in self._waiting if not r.cancelled and self._admissible(r)]
            if not candidates:
                return None
            req = self._pick(candidates)
            self._waiting.remove(req)
        self.counters.charge_prompt(req.request.tenant, self._prompt_cost(req), req.request.weight)
        return req

    def _pick(self, candidates: list[_Live]) -> _Live:
        """`fifo`: the oldest. `fair`: the oldest of the tenant with the least service (`fairness.py`)
        among those under their row limit."""
        if self.engine.config.scheduling == "fifo":
            return candidates[0]
        heads = self._heads(candidates)
        if len(heads) > 1 and any(r.request.max_rows is not None for r in heads.values()):
            # work-conserving: a lone tenant, or every waiting tenant at its limit, is not held back
            rows = collections.Counter(r.request.tenant for r in self._rows if r is not None)
            under = {t: r for t, r in heads.items() if r.request.max_rows is None or rows[t] < r.request.max_rows}
            heads = under or heads
        return heads[self.counters.least_served(heads)]

    @staticmethod
    def _heads(reqs) -> dict[str, _Live]:
        """Each tenant's first request of `reqs` (in arrival order, so on a tie in service the
        tenant whose head came first goes first)."""
        heads: dict[str, _Live] = {}
        for r in reqs:
            heads.setdefault(r.request.tenant, r)
        return heads

    def _decode(self) -> None:
        t0 = time.monotonic()
        busy = self._decoding()
        grammars = [None] * len(self._rows)
        for req in busy:
            grammars[req.row] = req.grammar
        constrained = (grammars,) if any(g is not None for g in grammars) else ()
        self._state, out = self.engine.generate(self.slots.stack, self._state, *constrained)
        out = jax.device_get(out)
        steps = out.token.shape[0]
        accepted = 0
        for req in busy:
            if req.grammar is not None and req.grammar.error is not None:  # a parser limit hit inside the call
                self._retire(req, "error", InvalidRequest(f"the response's grammar failed: {req.grammar.error}",
                                                          param="response_format"))
            for s in range(steps):
                if req.done:
                    break  # finished at an earlier step of this call
                b = req.row
                self._accept(req, int(out.token[s, b]), float(out.logprob[s, b]), out.top_ids[s, b], out.top_logprobs[s, b])
                accepted += 1
        self.metrics.record_decode(time.monotonic() - t0, len(busy), len(self._prefilling), len(self._rows), steps,
                                   accepted)

    def _accept(self, req: _Live, token: int, logprob: float, top_ids: np.ndarray, top_lps: np.ndarray) -> None:
        req.generated += 1
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        self.counters.charge_completion(req.request.tenant, 1, req.request.weight)
        n_top = req.request.params.logprobs or 0
        top = tuple((int(top_ids[i]), float(top_lps[i])) for i in range(n_top))
        req.stream.put(TokenEvent(token, logprob, top, req.choice))
        if token in req.request.stop_ids:
            self._retire(req, "stop")
        elif req.generated >= req.request.params.max_tokens:
            self._retire(req, "length")

    def _retire(self, req: _Live, reason: str, error: BaseException | None = None) -> None:
        if req.done:
            return
        if req.row is not None:
            self._rows[req.row] = None
            if req in self._prefilling:
                self._prefilling.remove(req)
            if req.request.adapter is not None:
                self.slots.release(req.slot)
        else:
            with self._cond:
                if req in self._waiting:
                    self._waiting.remove(req)
        self._finish(req, reason, error)

    def _finish(self, req: _Live, reason: str, error: BaseException | None = None) -> None:
        now = time.monotonic()
        ttft = None if req.first_token_at is None else req.first_token_at - req.request.submitted_at
        self.metrics.record_finish(ttft, now - req.request.submitted_at, req.generated, "error" if error else reason)
        req.done = True
        if req.saved is not None:  # it ended while preempted (cancelled, or its adapter failed)
            req.saved = None
            self._swapped -= 1
        req.stream.put(Finished(reason if error is None else "error", len(req.request.prompt), req.generated,
                                now - req.request.submitted_at, ttft, req.request.seed, req.request.adapter, error,
                                req.preemptions, req.stream.cached_tokens, req.choice))
        for f in req.followers:  # choices still waiting for its prompt end with it
            if f.prefilling:
                self._retire(f, reason, error)

    def _fail_all(self, error: BaseException) -> None:
        self._prefilling.clear()
        for row, req in enumerate(self._rows):
            if req is not None:
                self._rows[row] = None
                self._finish(req, "error", error)
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            self._finish(req, "error", error)
