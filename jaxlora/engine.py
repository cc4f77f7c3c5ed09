"""The device half of the engine: JetStream's prefill / generate over fixed shapes, in chunks.

    prefill(lora, state, items)   -> (DecodeState, first tokens, ChunkKV, prompt logprobs)  the next
                                     chunk of up to `prefill_batch` rows' prompts, written into their
                                     rows' caches
    put_chunk(state, kv, row, start) -> DecodeState   a cached chunk's KV into a row (prefix cache)
    fork(state, row, rows, ...)   -> DecodeState   a prefilled row's prompt shared by more rows (`n`)
    generate(lora, state)         -> (DecodeState, StepTokens)  `decode_steps` tokens for every row

Why this split: prefill is compute-bound and decode memory-bound. Decode runs all `max_batch_size`
rows together, several steps per device call (`lax.scan`), with the KV cache donated so XLA
updates it in place. Prefill goes straight into the decode rows, `prefill_chunk` tokens of a
prompt at a time, aligned to position 0: chunk i of a prompt always covers positions
[i*C, (i+1)*C) and attends to the first `window(i*C)` cache entries, so its shapes depend on its
place alone, never on the call, the batch or the cache hit it comes in. That is what lets the
scheduler interleave a long prompt's chunks with decode calls, and what makes a cached chunk
(`prefix_cache.py`) bitwise the chunk a fresh prefill computes. Every shape is fixed by the config
(batch, cache length, chunk, windows), so after `warm_up` no request compiles anything;
`compile_count()` counts XLA compilations to prove it.

Rows that are free or still prefilling run in every decode call too (their outputs are ignored; a
prefilling row is parked past the cache end, where its steps write nothing): a fixed shape is
cheaper than a recompile. Each row only ever reads its own cache, adapter slot, random key, token
history (`sampling.TokenHistory`, for the penalties) and, for a row with a grammar, its own mask
(`grammar.py`; fetched from the host at each step, `_generate`), so its tokens do not depend on
what the other rows hold. The host loop that decides what goes in which row is in `scheduler.py`; this
module has no queues and no threads.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlora import kernels
from jaxlora.config import ModelConfig
from jaxlora.errors import InvalidRequest
from jaxlora.fairness import POLICIES
from jaxlora.grammar import BatchMasks, Matcher
from jaxlora.lora import LoraStack, gather_rows
from jaxlora.model import KVCache, Params, forward, hidden_states, lm_head
from jaxlora.sampling import MAX_LOGPROBS, RowSampling, SamplingParams, TokenHistory, allowed_only, count_dtype, sample


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's options; also the `engine:` block of serve_config.yaml (validated field for
    field by pydantic at the Serve layer, which refuses unknown keys through __pydantic_config__)."""

    __pydantic_config__ = {"extra": "forbid"}

    max_batch_size: int = 8
    """Decode rows; every generate call computes all of them."""
    max_seq_len: int = 512
    """KV cache length per row: prompt + max_tokens must fit."""
    prefill_chunk: int = 64
    """Prompts are prefilled in chunks of this many tokens, aligned to position 0; each chunk
    attends to what its row's cache holds. Also the prefix cache's unit. max_seq_len (or more, which
    is taken as max_seq_len): one shot."""
    prefill_tokens_per_turn: int | None = 128
    """While the decoding rows are at least as many as the rows waiting for their prompts, prefill
    calls per turn of the loop stop once their chunks (counted at `prefill_batch` x
    `prefill_chunk` a call, padding included) reach this; at least one call runs. None: one call
    per turn. When the waiting rows outnumber the decoding ones (nothing decoding included), every
    prompt is prefilled before the next decode call (`Scheduler._prefill`, the idle-row rule). The
    trade: each call a turn delays the decoding rows' next tokens by one chunk's time
    (docs/benchmarks.md)."""
    prefix_cache_bytes: int = 256 * 2**20
    """KV of complete prompt chunks kept for reuse (`prefix_cache.py`), LRU beyond this; 0: off."""
    decode_steps: int = 8
    """Tokens per row per generate call: more is faster, fewer streams sooner."""
    prefill_batch: int = 1
    """Rows whose next chunks share an attention window, prefilled together in one call (unused
    places are padding, computed all the same). 1 never pads, so a lone prompt's chunks cost least
    (the latency choice). A call also has a fixed cost (the weights read once per call), so a
    burst of prompts costs less a prompt with more (4: ~40% less on CPU, docs/benchmarks.md) while
    a lone prompt pays for the padding in every chunk; a GPU may want more."""
    max_queue: int = 256
    """Requests waiting for a row beyond this are refused at once (overload)."""
    num_adapter_slots: int = 8
    """Device adapter slots, including slot 0 (the base model)."""
    max_lora_rank: int = 16
    host_adapter_cache: int = 64
    """Adapters kept in host memory behind the device slots."""
    dtype: str = "float32"
    """Weights, activations and KV cache: float32 or bfloat16 (norms, softmax and logits stay float32)."""
    scheduling: str = "fair"
    """Who gets a free row: `fair` (least service in tokens across tenants, `fairness.py`) or `fifo`."""
    completion_token_weight: float = 2.0
    """Under `fair`, a completion token counts as this many prompt tokens of service."""
    max_queued_per_tenant: int | None = None
    """A tenant with this many requests waiting for a row has its next one refused (429); None: no limit."""
    max_rows_per_tenant: int | None = None
    """Under `fair`: while other tenants wait, a tenant holding this many rows gets no more (a lone
    tenant still gets every row); None: no limit."""
    max_preemptions: int = 1
    """Under `fair`: how often one request may be swapped out of its row (to host memory, resumed
    bitwise where it left off) so a tenant far behind gets a row at once; 0: never."""

    def __post_init__(self):
        for name in ("max_batch_size", "decode_steps", "prefill_batch", "prefill_chunk", "max_lora_rank",
                     "host_adapter_cache"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if self.prefill_chunk > self.max_seq_len:  # one shot: a chunk never reaches past the cache
            object.__setattr__(self, "prefill_chunk", self.max_seq_len)
        if self.prefill_tokens_per_turn is not None and self.prefill_tokens_per_turn < 1:
            raise ValueError(f"prefill_tokens_per_turn must be >= 1 (or null: one call a turn), got "
                             f"{self.prefill_tokens_per_turn}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0: no prefix cache), got {self.prefix_cache_bytes}")
        if self.num_adapter_slots < 2:
            raise ValueError("num_adapter_slots must be >= 2 (slot 0 is the base model)")
        if self.max_preemptions < 0:
            raise ValueError(f"max_preemptions must be >= 0, got {self.max_preemptions}")
        for name in ("max_queued_per_tenant", "max_rows_per_tenant"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null: no limit), got {getattr(self, name)}")
        if self.scheduling not in POLICIES:
            raise ValueError(f"scheduling must be one of {', '.join(POLICIES)}, got {self.scheduling!r}")
        if not self.completion_token_weight > 0:
            raise ValueError(f"completion_token_weight must be > 0, got {self.completion_token_weight}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def windows(self) -> tuple[int, ...]:
        """How much of the cache a prefill chunk's attention reads: the chunk size times a power of
        two, and max_seq_len (one compile each)."""
        out, w = [], self.prefill_chunk
        while w < self.max_seq_len:
            out.append(w)
            w *= 2
        return (*out, self.max_seq_len)

    def window(self, start: int) -> int:
        """The window of the chunk that starts at `start`: a function of the chunk's place alone, so
        the chunk is computed in the same shapes whichever call, batch or cache hit it comes in."""
        end = start + self.prefill_chunk
        return next((w for w in self.windows if w >= end), self.max_seq_len)

    def check_request(self, prompt_len: int, max_tokens: int | None, n: int = 1, prompt: str = "prompt") -> int:
        """The request's max_tokens (None resolved to `default_max_tokens`), or InvalidRequest when its
        prompt (named `prompt` in the message) is empty, its prompt and max_tokens do not fit one row,
        or it asks for more choices than there are rows (a request's choices decode at once)."""
        if prompt_len == 0:
            raise InvalidRequest(f"the {prompt} is empty: give at least one token", param="prompt")
        if max_tokens is None:
            max_tokens = self.default_max_tokens(prompt_len)
        if prompt_len + max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"{prompt} ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds this "
                f"model's max_seq_len of {self.max_seq_len}; shorten the prompt or lower max_tokens", param="max_tokens")
        if n > self.max_batch_size:
            raise InvalidRequest(f"n ({n}) exceeds the {self.max_batch_size} choices this model's replicas decode at "
                                 "once (max_batch_size); ask for fewer", param="n")
        return max_tokens

    def default_max_tokens(self, prompt_len: int) -> int:
        """A request that gives no max_tokens may fill the rest of the context (at least one token;
        a prompt that leaves none is then refused for its length)."""
        return max(1, self.max_seq_len - prompt_len)

    @property
    def jnp_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepTokens:
    """What generate or prefill produced; leading axis = steps for generate."""

    token: jax.Array  # [..., B] int32
    logprob: jax.Array  # [..., B] float32
    top_ids: jax.Array  # [..., B, 5] int32
    top_logprobs: jax.Array  # [..., B, 5] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkKV:
    """The keys and values one prefill call wrote, per layer [P, C, K, H] (the cache's dtype): what
    the prefix cache keeps of the rows whose chunk was a complete one."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: KVCache  # L x [B, K, S, H]
    tokens: jax.Array  # [B] int32: the token each row feeds next
    positions: jax.Array  # [B] int32: where that token goes
    index: jax.Array  # [B] int32: how many tokens the row has generated (its PRNG counter)
    slots: jax.Array  # [B] int32: adapter slot
    sampling: RowSampling
    history: TokenHistory  # [B, V] per field: what the penalties read; `tokens` already counted


def _write_rows(cache_BxKxSxH: jax.Array, rows_P: jax.Array, positions_PxC: jax.Array, new_PxCxKxH: jax.Array) -> jax.Array:
    """Entries new[p, c] into row rows_P[p] at positions_PxC[p, c]; rows or positions out of range
    are dropped (that is how padding places write nothing)."""
    return cache_BxKxSxH.at[rows_P[:, None], :, positions_PxC].set(new_PxCxKxH.astype(cache_BxKxSxH.dtype), mode="drop")


def _prefill_chunk(params: Params, lora: LoraStack, state: DecodeState, prompt_PxT, start_P, true_len_P, rows_P, slot_P,
                   sampling: RowSampling, mask_PxW, constrained_P, prompt_lp_P, cfg: ModelConfig, counts, chunk: int,
                   window: int):
    """One chunk of each of P rows' prompts: tokens [start, start + chunk) of prompt_PxT[p] go
    through the model against row rows_P[p]'s cache (the first `window` entries: what the prompt
    put there so far), and their keys and values into it. A row whose prompt ends in this chunk gets
    its first token sampled and its decode fields set; a row with more chunks to go is parked at
    position max_seq_len, where the decode steps that run between its chunks write nothing. A
    negative row is padding and changes nothing. A constrained place's first token is drawn from the
    tokens its grammar's bitmask (mask_PxW) allows. For places that ask (prompt_lp_P), also the
    log-probabilities of the prompt's own tokens: at [p, c], of the token at position start + c + 1
    given those before it (the model's distribution, no sampling stage), with the top alternatives;
    skipped (`lax.cond`) when no place asks."""
    P, C, W = rows_P.shape[0], chunk, window
    B, S = state.tokens.shape[0], state.cache.max_len
    valid_P = rows_P >= 0
    read_P = jnp.where(valid_P, rows_P, 0)
    tokens_PxC = jax.vmap(lambda p, s: jax.lax.dynamic_slice_in_dim(p, s, C))(prompt_PxT, start_P)
    positions_PxC = start_P[:, None] + jnp.arange(C, dtype=jnp.int32)
    rows_cache = KVCache(k=tuple(k[read_P, :, :W] for k in state.cache.k), v=tuple(v[read_P, :, :W] for v in state.cache.v))
    x_PxCxD, rows_cache = hidden_states(params, tokens_PxC, positions_PxC, cfg, rows_cache, lora, slot_P)
    # what this call wrote, read back from where it went (positions past the window are past the cache)
    written = ChunkKV(*(tuple(c[jnp.arange(P)[:, None], :, positions_PxC] for c in kv) for kv in (rows_cache.k, rows_cache.v)))
    write_P = jnp.where(valid_P, rows_P, B)
    cache = KVCache(k=tuple(_write_rows(c, write_P, positions_PxC, n) for c, n in zip(state.cache.k, written.k)),
                    v=tuple(_write_rows(c, write_P, positions_PxC, n) for c, n in zip(state.cache.v, written.v)))

    last_P = jnp.clip(true_len_P - 1 - start_P, 0, C - 1)
    last_PxV = lm_head(params, jnp.take_along_axis(x_PxCxD, last_P[:, None, None], axis=1))[:, 0]  # only what is sampled
    last_PxV = allowed_only(last_PxV, mask_PxW, constrained_P)
    history = TokenHistory.of_prompts(prompt_PxT, true_len_P, cfg.vocab_size, counts)
    first = StepTokens(*sample(last_PxV, sampling, history, jnp.zeros((P,), jnp.int32)))
    final_P = valid_P & (start_P + C >= true_len_P)
    done_P = jnp.where(final_P, rows_P, B)  # rows that decode from the next step on
    parked_P = jnp.where(valid_P & ~final_P, rows_P, B)

    def put(dst, src):
        return dst.at[done_P].set(src.astype(dst.dtype), mode="drop")

    state = DecodeState(
        cache=cache, tokens=put(state.tokens, first.token),
        positions=put(state.positions, true_len_P).at[parked_P].set(S, mode="drop"),
        index=put(state.index, jnp.ones_like(true_len_P)), slots=put(state.slots, slot_P),
        sampling=jax.tree.map(put, state.sampling, sampling),
        history=jax.tree.map(put, state.history, history.add(first.token)),
    )
    next_PxC = jax.vmap(lambda p, s: jax.lax.dynamic_slice_in_dim(p, s + 1, C))(prompt_PxT, start_P)
    prompt = jax.lax.cond(jnp.any(prompt_lp_P), lambda: _prompt_logprobs(params, x_PxCxD, next_PxC),
                          lambda: _no_prompt_logprobs(P, C))
    return state, first, written, prompt


def _prompt_logprobs(params: Params, x_PxCxD: jax.Array, next_PxC: jax.Array) -> StepTokens:
    """log p(next_PxC[p, c] | the prompt up to c) and the top alternatives, from the chunk's hidden states."""
    logprobs_PxCxV = jax.nn.log_softmax(lm_head(params, x_PxCxD), axis=-1)
    chosen_PxC = jnp.take_along_axis(logprobs_PxCxV, next_PxC[..., None], axis=-1)[..., 0]
    top_PxCx5, top_ids_PxCx5 = jax.lax.top_k(logprobs_PxCxV, MAX_LOGPROBS)
    return StepTokens(next_PxC, chosen_PxC, top_ids_PxCx5.astype(jnp.int32), top_PxCx5)


def _no_prompt_logprobs(P: int, C: int) -> StepTokens:
    return StepTokens(jnp.zeros((P, C), jnp.int32), jnp.zeros((P, C), jnp.float32),
                      jnp.zeros((P, C, MAX_LOGPROBS), jnp.int32), jnp.zeros((P, C, MAX_LOGPROBS), jnp.float32))


def _fork(state: DecodeState, row, rows_B, sampling: RowSampling, token, position) -> DecodeState:
    """Row `row`'s prompt into rows rows_B (padding: out of range, dropped): its cache, adapter slot
    and prompt history, each with its own sampling and nothing generated yet. Each fed `token` (the
    prompt's last) at `position` (where it is), so its first decode step recomputes the prompt's
    last place and samples the row's first token with its own key (index 0)."""

    def put(dst, src):
        return dst.at[rows_B].set(src.astype(dst.dtype), mode="drop")

    B = rows_B.shape[0]
    copy = lambda c: c.at[rows_B].set(jnp.broadcast_to(c[row], (B, *c.shape[1:])), mode="drop")  # noqa: E731
    history = TokenHistory(generated=put(state.history.generated, jnp.zeros((B, state.history.generated.shape[1]))),
                           in_prompt=copy(state.history.in_prompt))
    return DecodeState(
        cache=KVCache(k=tuple(map(copy, state.cache.k)), v=tuple(map(copy, state.cache.v))),
        tokens=put(state.tokens, jnp.full((B,), token)), positions=put(state.positions, jnp.full((B,), position)),
        index=put(state.index, jnp.zeros((B,), jnp.int32)), slots=copy(state.slots),
        sampling=jax.tree.map(put, state.sampling, sampling), history=history)


def _put_chunk(state: DecodeState, kv: ChunkKV, row, start) -> DecodeState:
    """One cached chunk (per layer [C, K, H]) into row `row` at positions [start, start + C) (a
    contiguous block: a slice update, not a scatter); the row is parked (as a prefilling row is), so
    decode calls before its next chunk write nothing there."""

    def put(cache_BxKxSxH, new_CxKxH):
        block = new_CxKxH.transpose(1, 0, 2)[None].astype(cache_BxKxSxH.dtype)  # [1, K, C, H]
        return jax.lax.dynamic_update_slice(cache_BxKxSxH, block, (row, 0, start, 0))

    return dataclasses.replace(state, positions=state.positions.at[row].set(state.cache.max_len),
                               cache=KVCache(k=tuple(map(put, state.cache.k, kv.k)), v=tuple(map(put, state.cache.v, kv.v))))


def _row_of(state: DecodeState, row) -> DecodeState:
    """Row `row` of every field, as a state of one row."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0), state)


def _put_row(saved: DecodeState, state: DecodeState, row, slot) -> DecodeState:
    """`saved` (one row) into row `row`, on adapter slot `slot` (the adapter's slot may differ now)."""
    state = jax.tree.map(lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src, row, axis=0), state, saved)
    return dataclasses.replace(state, slots=state.slots.at[row].set(slot))


def _generate(params: Params, lora: LoraStack, state: DecodeState, constrained_B, mask_source, cfg: ModelConfig, steps: int,
              host_masks):
    """`steps` decode steps for every row (`lax.scan`). A constrained row (constrained_B) samples among
    the tokens its grammar allows: each step calls `host_masks(mask_source, fed tokens [B], words)
    -> [B, words]`, which runs on the host (the row's matcher consumes the token the row feeds, then
    gives the mask of the token it samples, `grammar.BatchMasks.step`), and applies it to the
    logits; without a constrained row the call and the mask are skipped (`lax.cond`), so the other
    rows' arithmetic is the same either way."""
    B = state.tokens.shape[0]
    words = (cfg.vocab_size + 31) // 32
    if cfg.decode_kernels:  # the CPU LoRA kernel reads each row's slot in place
        if lora.dtype != jnp.float32:
            raise ValueError(f"the adapter stack is {lora.dtype}, but this engine's decode kernels take float32: "
                             "build it with the engine's dtype")
        rows_lora, rows_slots = lora, state.slots
    else:  # XLA's form: each row's adapter gathered once per call, not once per step (a row's slot is fixed here)
        rows_lora, rows_slots = gather_rows(lora, state.slots), None

    def step(state: DecodeState, _):
        logits_Bx1xV, cache = forward(params, state.tokens[:, None], state.positions[:, None], cfg, state.cache, rows_lora,
                                      rows_slots)
        mask_BxW = jax.lax.cond(
            jnp.any(constrained_B),
            lambda: host_masks(mask_source, state.tokens, words),
            lambda: jnp.full((B, words), -1, jnp.int32))
        logits_BxV = allowed_only(logits_Bx1xV[:, 0], mask_BxW, constrained_B)
        out = StepTokens(*sample(logits_BxV, state.sampling, state.history, state.index))
        state = dataclasses.replace(state, cache=cache, tokens=out.token, positions=state.positions + 1, index=state.index + 1,
                                    history=state.history.add(out.token))
        return state, out

    return jax.lax.scan(step, state, None, length=steps)


@dataclasses.dataclass(frozen=True)
class PrefillItem:
    """One row's next prefill chunk: tokens [start, start + prefill_chunk) of `prompt` into `row`."""

    row: int
    prompt: tuple[int, ...]
    start: int
    slot: int
    params: SamplingParams
    seed: int
    grammar: Matcher | None = None  # its first token is drawn from what this grammar allows
    prompt_logprobs: bool = False  # also the log-probabilities of the chunk's prompt tokens


class _CompileCounter:
    """Counts the programs this process builds, compiled or loaded from the persistent compilation
    cache (`jaxlora.compile_cache`), through jax.monitoring (counted, not assumed)."""

    _lock = threading.Lock()
    _count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._on_event)
                cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # timed around compile-or-load
            with cls._lock:
                cls._count += 1

    @classmethod
    def count(cls) -> int:
        return cls._count


def compile_count() -> int:
    _CompileCounter.install()
    return _CompileCounter.count()


class Engine:
    """Holds the model and the jitted device functions for one replica (`scheduler.EngineApi`)."""

    def __init__(self, params: Params, cfg: ModelConfig, config: EngineConfig):
        _CompileCounter.install()
        self.params = params
        self.model_config = cfg
        self.config = config
        # Decided once for the replica, and the kernels built now, not inside the first request:
        # decode steps run attention and LoRA through the CPU kernels (float32 weights, cache and
        # adapters, kernels built here) or through XLA's forms. The replica's metrics report which.
        self.decode_kernels = kernels.applies(params.embed.dtype) and kernels.applies(config.jnp_dtype)
        decode_cfg = dataclasses.replace(cfg, decode_kernels=self.decode_kernels)
        self._counts = count_dtype(config.max_seq_len)
        self._prefill_chunk = jax.jit(functools.partial(_prefill_chunk, cfg=cfg, counts=self._counts,
                                                        chunk=config.prefill_chunk),
                                      static_argnames=("window",), donate_argnums=(2,))
        self._put_chunk = jax.jit(_put_chunk, donate_argnums=(0,))
        self._fork = jax.jit(_fork, donate_argnums=(0,))
        self._masks = BatchMasks(cfg.vocab_size)
        self._grammars: list[Matcher | None] = [None] * config.max_batch_size  # the rows' matchers during a call
        if kernels.available():  # a custom call: the decode program stays in the persistent compilation cache
            self._mask_source = jnp.int32(kernels.register_mask_source(self._step_masks))
            host_masks = kernels.host_masks
        else:  # elsewhere (a GPU) jax's callback, whose programs are compiled at each start
            self._mask_source = jnp.int32(0)

            def host_masks(_source, fed_B, words):
                return io_callback(self._step_masks, jax.ShapeDtypeStruct((fed_B.shape[0], words), jnp.int32), fed_B,
                                   ordered=False)
        self._generate = jax.jit(functools.partial(_generate, cfg=decode_cfg, steps=config.decode_steps,
                                                   host_masks=host_masks),
                                 donate_argnums=(2,))
        self._row_of = jax.jit(_row_of)
        self._put_row = jax.jit(_put_row, donate_argnums=(1,))

    def _step_masks(self, fed_B: np.ndarray) -> np.ndarray:
        """The decode call's host callback: the constrained rows' masks for this step."""
        return self._masks.step(self._grammars, np.asarray(fed_B))

    @property
    def mask_stats(self) -> tuple[int, float]:
        """(masks computed, host seconds spent on them) since the engine was built."""
        return self._masks.masks, self._masks.seconds

    def init_state(self) -> DecodeState:
        B, V = self.config.max_batch_size, self.vocab_size

        def zeros(dtype=jnp.int32, shape=(B,)):  # a fresh buffer per field: donated buffers must not be shared
            return jnp.zeros(shape, dtype)

        return DecodeState(
            cache=KVCache.zeros(self.model_config, B, self.config.max_seq_len, self.params.embed.dtype),
            tokens=zeros(), positions=zeros(), index=zeros(), slots=zeros(),
            sampling=RowSampling.of([(SamplingParams(temperature=0.0), 0)] * B),
            history=TokenHistory(generated=zeros(self._counts, (B, V)), in_prompt=zeros(jnp.bool_, (B, V))),
        )

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def kv_cache_bytes(self) -> int:
        """The decode rows' KV cache: 2 x layers x rows x kv heads x max_seq_len x head_dim entries."""
        cfg = self.model_config
        return (2 * cfg.num_layers * self.config.max_batch_size * cfg.num_kv_heads * self.config.max_seq_len
                * cfg.head_dim * self.params.embed.dtype.itemsize)

    def prefill(self, lora: LoraStack, state: DecodeState, items: list[PrefillItem]
                ) -> tuple[DecodeState, StepTokens, ChunkKV, StepTokens]:
        """The next chunk of up to `prefill_batch` rows whose chunks share one attention window
        (`EngineConfig.window`), padded with dummy places to exactly `prefill_batch`, so the shapes
        depend on the window alone. Returns the new state, each place's first token (meaningful
        where its prompt ended in this chunk), the keys and values the call wrote, and the prompt
        log-probabilities [P, C] of the places that asked for them (`PrefillItem.prompt_logprobs`):
        at [p, c] the token at position start + c + 1 (meaningful while that is inside the prompt),
        its log-probability and the top alternatives."""
        P, C, S = self.config.prefill_batch, self.config.prefill_chunk, self.config.max_seq_len
        windows = {self.config.window(item.start) for item in items}
        if len(items) > P or len(windows) != 1 or any(not 0 <= i.start < len(i.prompt) for i in items):
            raise ValueError(f"prefill takes at most {P} rows whose chunks start inside their prompts and share a window")
        padding = PrefillItem(row=-1, prompt=(0,), start=0, slot=0, params=SamplingParams(max_tokens=1, temperature=0.0),
                              seed=0)
        items = list(items) + [padding] * (P - len(items))
        prompts = np.zeros((P, S + C), np.int32)  # room for a whole chunk past any start
        for i, item in enumerate(items):
            prompts[i, : len(item.prompt)] = item.prompt

        def column(field):
            return jnp.array([getattr(item, field) for item in items], jnp.int32)

        grammars = [i.grammar for i in items]
        return self._prefill_chunk(self.params, lora, state, prompts, column("start"),
                                   jnp.array([len(i.prompt) for i in items], jnp.int32), column("row"), column("slot"),
                                   RowSampling.of([(i.params, i.seed) for i in items]), self._masks.initial(grammars),
                                   jnp.array([g is not None for g in grammars]),
                                   jnp.array([i.prompt_logprobs for i in items]), window=windows.pop())

    def fork(self, state: DecodeState, row: int, prompt: tuple[int, ...], rows: list[int],
             sampling: list[tuple[SamplingParams, int]]) -> DecodeState:
        """Shares row `row`'s prefilled `prompt` with `rows` (more choices of one request, `n`), each
        with its (params, seed): each then decodes as a row of its own, its first token sampled by its
        first decode step (the prompt's last place recomputed there) with its own key."""
        B = self.config.max_batch_size
        if not rows or len(rows) != len(sampling) or row in rows:
            raise ValueError("fork takes one row for each (params, seed), none of them the source row")
        pad = [(SamplingParams(temperature=0.0), 0)] * (B - len(rows))
        return self._fork(state, jnp.int32(row), jnp.array(list(rows) + [B] * (B - len(rows)), jnp.int32),
                          RowSampling.of(list(sampling) + pad), jnp.int32(prompt[-1]), jnp.int32(len(prompt) - 1))

    def put_chunk(self, state: DecodeState, kv: ChunkKV, row: int, start: int) -> DecodeState:
        """Writes one chunk's keys and values (per layer [C, K, H], e.g. from the prefix cache) into
        row `row` at [start, start + prefill_chunk): bitwise what prefilling that chunk there writes."""
        return self._put_chunk(state, kv, jnp.int32(row), jnp.int32(start))

    def generate(self, lora: LoraStack, state: DecodeState, grammars: list[Matcher | None] | None = None
                 ) -> tuple[DecodeState, StepTokens]:
        """Runs `decode_steps` steps for every row; the StepTokens fields are [steps, B, ...].
        `grammars[b]`: row b's matcher (None: unconstrained), advanced by the call's steps. The
        caller waits for the result before it changes them (the call reads them on the host)."""
        grammars = list(grammars or [None] * len(self._grammars))
        self._grammars = grammars
        return self._generate(self.params, lora, state, jnp.array([g is not None for g in grammars]), self._mask_source)

    def swap_out(self, state: DecodeState, row: int) -> DecodeState:
        """A copy of row `row` in host memory (numpy): its whole KV cache, the token it feeds next,
        position, PRNG counter, sampling parameters and penalty history, i.e. all a decode step reads
        of it. The row itself is left as it is (the next request into it overwrites what it reads)."""
        return jax.device_get(self._row_of(state, jnp.int32(row)))

    def swap_in(self, saved: DecodeState, state: DecodeState, row: int, slot: int) -> DecodeState:
        """Puts a `swap_out` copy back into row `row` (any row) with its adapter now in `slot`: the
        row's next steps compute what they would have computed had it never left."""
        return self._put_row(saved, state, jnp.int32(row), jnp.int32(slot))

    def warm_up(self, lora: LoraStack) -> None:
        """Compiles every shape a request can use: a prefill chunk in each window, the chunk write of
        the prefix cache, a fork, generate, swap. Every sampling stage is a branch (`lax.cond`) of these
        same calls, so a greedy request compiles the stages that penalties, logit_bias or min_p take too."""
        state = self.init_state()
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        C = self.config.prefill_chunk
        for w in self.config.windows:
            start = max(0, w - C)
            state, _, written, _ = self.prefill(lora, state, [PrefillItem(0, (0,) * (start + 1), start, 0, greedy, 0,
                                                                          prompt_logprobs=True)])
        state = self.put_chunk(state, jax.tree.map(lambda a: a[0], written), 0, 0)
        if self.config.max_batch_size > 1:
            state = self.fork(state, 0, (0,), [1], [(greedy, 0)])
        state, out = self.generate(lora, state)
        state = self.swap_in(self.swap_out(state, 0), state, 0, 0)
        jax.block_until_ready((out.token, state.tokens))
