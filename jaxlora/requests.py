"""A request as the engine loop sees it, and the channel its tokens come back on.

    Request       what was asked: prompt ids, sampling, seed, adapter version, stop ids (frozen)
    PromptLogprobs  the prompt tokens' log-probabilities (when asked for), before any token
    TokenEvent    one generated token of one choice, with its logprob and top alternatives
    Finished      a choice's last event: why it ended, usage, timings, or the error that ended it
    TokenStream   events pushed by the engine thread, read by a thread or a coroutine
    RequestHandle what `Scheduler.submit` returns: iterate it (sync or async), or cancel it
    MessagePacer  a message budget its consumers' streams share (the serving layer's stream pacing)

What it deliberately does not hold: where a request runs (row, slot, tokens so far): that state is
the scheduler's, acquired when a row is free and dropped when it is retired.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from jaxlora.adapter_store import ResolvedAdapter
from jaxlora.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    params: SamplingParams  # max_tokens resolved (never None here)
    seed: int
    adapter: ResolvedAdapter | None  # None: the base model
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and the request's stop_token_ids
    submitted_at: float  # time.monotonic()
    tenant: str = ""  # whose request: fair scheduling counts service per tenant
    weight: float = 1.0  # the tenant's share under fair scheduling (2: twice the tokens of a tenant of 1)
    max_rows: int | None = None  # under fair, the tenant's row limit while others wait (None: no limit)


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens under the model (`SamplingParams.prompt_logprobs`):
    entry i is of prompt token i + 1 given the tokens before it (the first token has none)."""
    logprobs: tuple[float, ...]  # [len(prompt) - 1]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]  # [len(prompt) - 1][k] (token id, logprob), best first


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # up to `logprobs` alternatives, best first
    choice: int = 0  # which of the request's `n` choices


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop token), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    seed: int
    adapter: ResolvedAdapter | None
    error: BaseException | None = None
    preemptions: int = 0  # how often it was swapped out of its row and back (fair scheduling)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    choice: int = 0  # which of the request's `n` choices ended


class TokenStream:
    """Events of one request (all its choices), pushed by the engine thread, read by a thread or a
    coroutine; it ends with the last choice's Finished."""

    def __init__(self, choices: int = 1):
        # prompt tokens whose KV came from the prefix cache: set at admission, before the first token
        self.cached_tokens = 0
        self.choices = choices
        self._open = choices  # choices whose Finished has not come yet
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        # (loop, event, how many events it waits for): woken once that many wait, or the last has come
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = []

    def put(self, item: TokenEvent | Finished) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            self._open -= isinstance(item, Finished)
            last, n = self._open == 0, len(self._items)
            ready = [w for w in self._async_waiters if last or n >= w[2]]
            if ready:
                self._async_waiters = [w for w in self._async_waiters if w not in ready]
        for loop, event, _ in ready:
            loop.call_soon_threadsafe(event.set)

    def get(self, timeout: float | None = None) -> TokenEvent | Finished:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no event from the engine in time")
            return self._items.popleft()

    async def take(self, n: int, not_before: float | None = None) -> list[TokenEvent | Finished]:
        """Every waiting event, once there are at least `n` of them and the clock (time.monotonic()) is
        past `not_before`, or as soon as the last one (the last choice's Finished) has come."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                early = not_before is not None and time.monotonic() < not_before
                if self._items and (self._open == 0 or (not early and len(self._items) >= n)):
                    items, self._items = list(self._items), collections.deque()
                    return items
                event = asyncio.Event()
                waiter = (loop, event, _LAST_ONLY if early else n)  # too early: only the last event wakes it
                self._async_waiters.append(waiter)
            if not early:
                await event.wait()
                continue
            try:
                await asyncio.wait_for(event.wait(), not_before - time.monotonic())
            except TimeoutError:
                with self._cond:
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)


_LAST_ONLY = float("inf")  # a waiter's count that no number of events reaches: woken by Finished alone


class RequestHandle:
    """A submitted request: iterate it (sync or async) for its events (PromptLogprobs first when asked
    for, TokenEvents), ending with the last of its choices' Finished."""

    def __init__(self, request: Request, stream: TokenStream, cancel: Callable[[], None]):
        self.request = request
        self._stream = stream
        self._cancel = cancel

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def adapter(self) -> ResolvedAdapter | None:
        return self.request.adapter

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache; final once the first token is out, so a
        consumer that stops early (a stop string) still knows it."""
        return self._stream.cached_tokens

    def cancel(self) -> None:
        """Ends the request: a waiting one leaves the queue, a running one frees its row."""
        self._cancel()

    def __iter__(self) -> Iterator[PromptLogprobs | TokenEvent | Finished]:
        open_ = self._stream.choices
        while open_:
            item = self._stream.get()
            yield item
            open_ -= isinstance(item, Finished)

    async def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self, interval: int = 1, pacer: "MessagePacer | None" = None
                      ) -> AsyncIterator[list[TokenEvent | Finished]]:
        """Events in batches: the first token as soon as it exists, then `interval` tokens at a time
        (fewer with the Finished that ends them; more when the consumer was busy). Larger batches keep
        per-message costs (a Ray streaming item, an SSE chunk) off the per-token path; the cost is a
        coarser stream, as with vLLM's stream_interval. With a `pacer`, the batches after the first are
        also spaced by its gap, so a busy server coarsens its streams while an idle one keeps them fine;
        the Finished that ends the request never waits."""
        want, not_before, pacing, open_ = 1, None, False, self._stream.choices
        try:
            while True:
                batch = await self._stream.take(want, not_before)
                yield batch
                open_ -= sum(isinstance(e, Finished) for e in batch)
                if not open_:
                    return
                want = interval
                if pacer is not None:
                    if not pacing:
                        pacer.streams, pacing = pacer.streams + 1, True
                    not_before = time.monotonic() + pacer.gap()
        finally:
            if pacing:
                pacer.streams -= 1


class MessagePacer:
    """A message budget shared by the streams of one event loop (a model replica's): each stream past
    its first message waits `gap()` = streams / `per_second` seconds between messages, so together they
    send about `per_second` messages a second however many there are. One stream alone waits
    1 / `per_second`, less than a decode call at a sensible rate, and keeps every call's tokens apart.
    Per-message costs (serialization, a Ray streaming item, an SSE chunk through ingress, proxy and
    client) are per stream and per message, not per token: under a flood of streams they, not the
    engine, are what delays a new request's first token."""

    def __init__(self, per_second: float):
        if per_second <= 0:
            raise ValueError(f"per_second must be > 0, got {per_second}")
        self.per_second = per_second
        self.streams = 0  # streams past their first message and not yet finished

    def gap(self) -> float:
        return self.streams / self.per_second
