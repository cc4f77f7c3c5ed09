"""The device half of the engine: JetStream's prefill / insert / generate over fixed shapes.

    prefill(params, lora, prompt) -> Prefix      one prompt, padded to a length bucket
    insert(prefix, state, row)    -> DecodeState  the prompt's KV cache and first token into a row
    generate(params, lora, state) -> (DecodeState, StepTokens)  `decode_steps` tokens for every row

Why this split: prefill is compute-bound and runs once per request at its own (bucketed) length;
decode is memory-bound and runs all `max_batch_size` rows together, so it is done for every row at
once, several steps per device call (`lax.scan`), with the KV cache donated so XLA updates it in
place. Every shape is fixed by the config (batch, cache length, buckets), so after `warm_up` no
request compiles anything; `compile_count()` counts XLA compilations to prove it.

Rows that are free still run (their outputs are ignored): a fixed shape is cheaper than a
recompile. Each row only ever reads its own cache, adapter slot, random key and token history
(`sampling.TokenHistory`, for the penalties), so its tokens do not depend on what the other rows
hold. The host loop that decides what goes in which row is in `scheduler.py`; this module has no
queues and no threads.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import kernels
from jaxlora.config import ModelConfig
from jaxlora.fairness import POLICIES
from jaxlora.lora import LoraStack, gather_rows
from jaxlora.model import KVCache, Params, forward, hidden_states, lm_head
from jaxlora.sampling import RowSampling, SamplingParams, TokenHistory, count_dtype, sample


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's options; also the `engine:` block of serve_config.yaml (validated field for
    field by pydantic at the Serve layer, which refuses unknown keys through __pydantic_config__)."""

    __pydantic_config__ = {"extra": "forbid"}

    max_batch_size: int = 8
    """Decode rows; every generate call computes all of them."""
    max_seq_len: int = 512
    """KV cache length per row: prompt + max_tokens must fit."""
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    """Prompt lengths are padded up to the smallest bucket that holds them (one compile each)."""
    decode_steps: int = 8
    """Tokens per row per generate call: more is faster, fewer streams sooner."""
    prefill_batch: int = 4
    """Prompts of the same length bucket prefilled together in one call (unused places are padding)."""
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
        for name in ("max_batch_size", "decode_steps", "prefill_batch", "max_lora_rank", "host_adapter_cache"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if not self.prefill_buckets or min(self.prefill_buckets) < 1:
            raise ValueError(f"prefill_buckets must be positive lengths, got {self.prefill_buckets}")
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
    def buckets(self) -> tuple[int, ...]:
        """The usable buckets: those below max_seq_len, plus max_seq_len itself."""
        return tuple(sorted({b for b in self.prefill_buckets if b < self.max_seq_len} | {self.max_seq_len}))

    def default_max_tokens(self, prompt_len: int) -> int:
        """A request that gives no max_tokens may fill the rest of the context (at least one token;
        a prompt that leaves none is then refused for its length)."""
        return max(1, self.max_seq_len - prompt_len)

    def bucket(self, n: int) -> int:
        """The padded length a prompt of `n` tokens is prefilled at."""
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than max_seq_len={self.max_seq_len}")

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
class Prefix:
    """P prefilled prompts of one length bucket: their KV caches and first generated tokens."""

    cache: KVCache  # L x [P, K, T, H]
    true_len: jax.Array  # [P] int32
    slot: jax.Array  # [P] int32
    sampling: RowSampling  # [P] per field
    first: StepTokens  # [P] per field
    history: TokenHistory  # [P, V] per field: the prompts, and the first tokens as generated


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


def _prefill(params: Params, lora: LoraStack, tokens_PxT, true_len_P, slot_P, sampling: RowSampling,
             cfg: ModelConfig, counts) -> Prefix:
    P, T = tokens_PxT.shape
    cache = KVCache.zeros(cfg, P, T, params.embed.dtype)
    positions_PxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
    x_PxTxD, cache = hidden_states(params, tokens_PxT, positions_PxT, cfg, cache, lora, slot_P)
    last_Px1xD = jnp.take_along_axis(x_PxTxD, (true_len_P - 1)[:, None, None], axis=1)
    last_PxV = lm_head(params, last_Px1xD)[:, 0]  # only what is sampled
    history = TokenHistory.of_prompts(tokens_PxT, true_len_P, cfg.vocab_size, counts)
    first = StepTokens(*sample(last_PxV, sampling, history, jnp.zeros((P,), jnp.int32)))
    return Prefix(cache=cache, true_len=true_len_P, slot=slot_P, sampling=sampling, first=first,
                  history=history.add(first.token))


def _insert(prefix: Prefix, state: DecodeState, rows_P) -> DecodeState:
    """Prefix p goes into decode row rows_P[p]; a negative row marks padding, which writes back
    what the (clamped) row already holds, so it changes nothing and needs no branch."""
    for p in range(rows_P.shape[0]):
        valid = rows_P[p] >= 0
        row = jnp.maximum(rows_P[p], 0)

        def put(dst, src, p=p, valid=valid, row=row):
            start = (row,) + (0,) * (dst.ndim - 1)
            current = jax.lax.dynamic_slice(dst, start, (1,) + src.shape[1:])
            return jax.lax.dynamic_update_slice(dst, jnp.where(valid, src[p][None].astype(dst.dtype), current), start)

        state = DecodeState(
            cache=KVCache(k=tuple(map(put, state.cache.k, prefix.cache.k)), v=tuple(map(put, state.cache.v, prefix.cache.v))),
            tokens=put(state.tokens, prefix.first.token),
            positions=put(state.positions, prefix.true_len),
            index=put(state.index, jnp.ones_like(prefix.true_len)),
            slots=put(state.slots, prefix.slot),
            sampling=jax.tree.map(put, state.sampling, prefix.sampling),
            history=jax.tree.map(put, state.history, prefix.history),
        )
    return state


def _row_of(state: DecodeState, row) -> DecodeState:
    """Row `row` of every field, as a state of one row."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0), state)


def _put_row(saved: DecodeState, state: DecodeState, row, slot) -> DecodeState:
    """`saved` (one row) into row `row`, on adapter slot `slot` (the adapter's slot may differ now)."""
    state = jax.tree.map(lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src, row, axis=0), state, saved)
    return dataclasses.replace(state, slots=state.slots.at[row].set(slot))


def _generate(params: Params, lora: LoraStack, state: DecodeState, cfg: ModelConfig, steps: int):
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
        out = StepTokens(*sample(logits_Bx1xV[:, 0], state.sampling, state.history, state.index))
        state = dataclasses.replace(state, cache=cache, tokens=out.token, positions=state.positions + 1, index=state.index + 1,
                                    history=state.history.add(out.token))
        return state, out

    return jax.lax.scan(step, state, None, length=steps)


class _CompileCounter:
    """Counts XLA backend compilations process-wide through jax.monitoring (counted, not assumed)."""

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
        if event == "/jax/core/compile/backend_compile_duration":
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
        self._prefill = jax.jit(functools.partial(_prefill, cfg=cfg, counts=self._counts))
        self._insert = jax.jit(_insert, donate_argnums=(1,))
        self._generate = jax.jit(functools.partial(_generate, cfg=decode_cfg, steps=config.decode_steps),
                                 donate_argnums=(2,))
        self._row_of = jax.jit(_row_of)
        self._put_row = jax.jit(_put_row, donate_argnums=(1,))

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

    def prefill(self, lora: LoraStack, items: list[tuple[list[int], int, SamplingParams, int]]) -> Prefix:
        """Prefills up to `prefill_batch` (prompt, slot, params, seed) of one length bucket, padded
        with dummy prompts to exactly `prefill_batch`, so the shape depends on the bucket alone."""
        P = self.config.prefill_batch
        T = self.config.bucket(max(len(prompt) for prompt, *_ in items))
        if len(items) > P or any(self.config.bucket(len(prompt)) != T for prompt, *_ in items):
            raise ValueError(f"prefill takes at most {P} prompts of one length bucket")
        padding = ([0], 0, SamplingParams(max_tokens=1, temperature=0.0), 0)
        items = list(items) + [padding] * (P - len(items))
        tokens = np.zeros((P, T), np.int32)
        for i, (prompt, *_) in enumerate(items):
            tokens[i, : len(prompt)] = prompt
        return self._prefill(self.params, lora, tokens, jnp.array([len(p) for p, *_ in items], jnp.int32),
                             jnp.array([slot for _, slot, *_ in items], jnp.int32),
                             RowSampling.of([(params, seed) for _, _, params, seed in items]))

    def insert(self, prefix: Prefix, state: DecodeState, rows: list[int]) -> DecodeState:
        """Puts prefix p into decode row rows[p] (the padding places are skipped)."""
        rows = list(rows) + [-1] * (self.config.prefill_batch - len(rows))
        return self._insert(prefix, state, jnp.array(rows, jnp.int32))

    def generate(self, lora: LoraStack, state: DecodeState) -> tuple[DecodeState, StepTokens]:
        """Runs `decode_steps` steps for every row; the StepTokens fields are [steps, B, ...]."""
        return self._generate(self.params, lora, state)

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
        """Compiles every shape a request can use: each prefill bucket, insert, generate, swap. Every
        sampling stage is a branch (`lax.cond`) of these same calls, so a greedy request compiles
        the stages that penalties, logit_bias or min_p take too."""
        state = self.init_state()
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        for T in self.config.buckets:
            prefix = self.prefill(lora, [([0] * T, 0, greedy, 0)])
            state = self.insert(prefix, state, [0])
        state, out = self.generate(lora, state)
        state = self.swap_in(self.swap_out(state, 0), state, 0, 0)
        jax.block_until_ready((out.token, state.tokens))

