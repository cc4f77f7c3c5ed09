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
recompile. Each row only ever reads its own cache, adapter slot and random key, so its tokens do
not depend on what the other rows hold. The host loop that decides what goes in which row is in
`scheduler.py`; this module has no queues and no threads.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.lora import LoraStack, gather_rows
from jaxlora.model import KVCache, Params, forward, hidden_states, lm_head
from jaxlora.sampling import SamplingParams, sample, split_seed


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    """Decode rows; every generate call computes all of them."""
    max_seq_len: int = 512
    """KV cache length per row: prompt + max_tokens must fit."""
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    """Prompt lengths are padded up to the smallest bucket that holds them (one compile each)."""
    decode_steps: int = 8
    """Tokens per row per generate call: more is faster, fewer streams sooner."""
    max_queue: int = 256
    """Requests waiting for a row beyond this are refused at once (overload)."""
    num_adapter_slots: int = 8
    """Device adapter slots, including slot 0 (the base model)."""
    max_lora_rank: int = 16
    host_adapter_cache: int = 64
    """Adapters kept in host memory behind the device slots."""
    dtype: str = "float32"
    """Weights, activations and KV cache: float32 or bfloat16 (norms, softmax and logits stay float32)."""

    def __post_init__(self):
        if self.max_batch_size < 1 or self.decode_steps < 1 or self.max_queue < 0:
            raise ValueError("max_batch_size and decode_steps must be >= 1 and max_queue >= 0")
        if self.num_adapter_slots < 2:
            raise ValueError("num_adapter_slots must be >= 2 (slot 0 is the base model)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The usable buckets: those below max_seq_len, plus max_seq_len itself."""
        return tuple(sorted({b for b in self.prefill_buckets if b < self.max_seq_len} | {self.max_seq_len}))

    @property
    def jnp_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling parameters, one entry per row."""

    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32
    seed_hi: jax.Array  # [B] uint32
    seed_lo: jax.Array  # [B] uint32
    want_logprobs: jax.Array  # [B] bool

    @classmethod
    def of(cls, p: SamplingParams, seed: int) -> "RowSampling":
        hi, lo = split_seed(seed)
        return cls(
            temperature=jnp.array([p.temperature], jnp.float32),
            top_k=jnp.array([p.top_k], jnp.int32),
            top_p=jnp.array([p.top_p], jnp.float32),
            seed_hi=jnp.array([hi], jnp.uint32),
            seed_lo=jnp.array([lo], jnp.uint32),
            want_logprobs=jnp.array([p.logprobs is not None], jnp.bool_),
        )


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
    """One prefilled prompt: its KV cache (bucket length) and its first generated token."""

    cache: KVCache  # L x [1, T, K, H]
    true_len: jax.Array  # [] int32
    slot: jax.Array  # [] int32
    sampling: RowSampling  # [1] per field
    first: StepTokens  # [1] per field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: KVCache  # L x [B, S, K, H]
    tokens: jax.Array  # [B] int32: the token each row feeds next
    positions: jax.Array  # [B] int32: where that token goes
    index: jax.Array  # [B] int32: how many tokens the row has generated (its PRNG counter)
    slots: jax.Array  # [B] int32: adapter slot
    sampling: RowSampling


def _prefill(params: Params, lora: LoraStack, tokens_1xT, true_len, slot, sampling: RowSampling, cfg: ModelConfig) -> Prefix:
    T = tokens_1xT.shape[1]
    cache = KVCache.zeros(cfg, 1, T, params.embed.dtype)
    positions_1xT = jnp.arange(T, dtype=jnp.int32)[None]
    x_1xTxD, cache = hidden_states(params, tokens_1xT, positions_1xT, cfg, cache, lora, slot[None])
    last_1xV = lm_head(params, jax.lax.dynamic_slice_in_dim(x_1xTxD, true_len - 1, 1, axis=1))[0]  # only what is sampled
    first = StepTokens(*sample(last_1xV, sampling.temperature, sampling.top_k, sampling.top_p,
                               sampling.seed_hi, sampling.seed_lo, jnp.zeros((1,), jnp.int32), sampling.want_logprobs))
    return Prefix(cache=cache, true_len=true_len, slot=slot, sampling=sampling, first=first)


def _insert(prefix: Prefix, state: DecodeState, row) -> DecodeState:
    def put(dst_B, src_1):
        return jax.lax.dynamic_update_slice_in_dim(dst_B, src_1.astype(dst_B.dtype), row, axis=0)

    cache = KVCache(
        k=tuple(jax.lax.dynamic_update_slice(d, s, (row, 0, 0, 0)) for d, s in zip(state.cache.k, prefix.cache.k)),
        v=tuple(jax.lax.dynamic_update_slice(d, s, (row, 0, 0, 0)) for d, s in zip(state.cache.v, prefix.cache.v)),
    )
    return DecodeState(
        cache=cache,
        tokens=put(state.tokens, prefix.first.token),
        positions=put(state.positions, prefix.true_len[None]),
        index=put(state.index, jnp.ones((1,), jnp.int32)),
        slots=put(state.slots, prefix.slot[None]),
        sampling=jax.tree.map(put, state.sampling, prefix.sampling),
    )


def _generate(params: Params, lora: LoraStack, state: DecodeState, cfg: ModelConfig, steps: int):
    rows_lora = gather_rows(lora, state.slots)  # once per call, not once per step: a row's slot is fixed here

    def step(state: DecodeState, _):
        logits_Bx1xV, cache = forward(params, state.tokens[:, None], state.positions[:, None], cfg, state.cache, rows_lora)
        s = state.sampling
        out = StepTokens(*sample(logits_Bx1xV[:, 0], s.temperature, s.top_k, s.top_p, s.seed_hi, s.seed_lo, state.index,
                                 s.want_logprobs))
        state = dataclasses.replace(state, cache=cache, tokens=out.token, positions=state.positions + 1, index=state.index + 1)
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
    """Holds the model and the jitted device functions for one replica."""

    def __init__(self, params: Params, cfg: ModelConfig, config: EngineConfig):
        _CompileCounter.install()
        self.params = params
        self.cfg = cfg
        self.config = config
        self._prefill = jax.jit(functools.partial(_prefill, cfg=cfg))
        self._insert = jax.jit(_insert, donate_argnums=(1,))
        self._generate = jax.jit(functools.partial(_generate, cfg=cfg, steps=config.decode_steps), donate_argnums=(2,))

    def init_state(self) -> DecodeState:
        B = self.config.max_batch_size

        def zeros(dtype=jnp.int32):  # a fresh buffer per field: donated buffers must not be shared
            return jnp.zeros((B,), dtype)

        return DecodeState(
            cache=KVCache.zeros(self.cfg, B, self.config.max_seq_len, self.params.embed.dtype),
            tokens=zeros(), positions=zeros(), index=zeros(), slots=zeros(),
            sampling=RowSampling(
                temperature=zeros(jnp.float32), top_k=zeros(), top_p=jnp.ones((B,), jnp.float32),
                seed_hi=zeros(jnp.uint32), seed_lo=zeros(jnp.uint32), want_logprobs=zeros(jnp.bool_),
            ),
        )

    def bucket(self, n: int) -> int:
        for b in self.config.buckets:
            if n <= b:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than max_seq_len={self.config.max_seq_len}")

    def prefill(self, lora: LoraStack, prompt: list[int], slot: int, params: SamplingParams, seed: int) -> Prefix:
        T = self.bucket(len(prompt))
        tokens = np.zeros((1, T), np.int32)
        tokens[0, : len(prompt)] = prompt
        return self._prefill(self.params, lora, tokens, jnp.int32(len(prompt)), jnp.int32(slot), RowSampling.of(params, seed))

    def insert(self, prefix: Prefix, state: DecodeState, row: int) -> DecodeState:
        return self._insert(prefix, state, jnp.int32(row))

    def generate(self, lora: LoraStack, state: DecodeState) -> tuple[DecodeState, StepTokens]:
        """Runs `decode_steps` steps for every row; the StepTokens fields are [steps, B, ...]."""
        return self._generate(self.params, lora, state)

    def warm_up(self, lora: LoraStack) -> None:
        """Compiles every shape a request can use: each prefill bucket, insert, generate."""
        state = self.init_state()
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        for T in self.config.buckets:
            prefix = self.prefill(lora, [0] * T, 0, greedy, 0)
            state = self.insert(prefix, state, 0)
        state, out = self.generate(lora, state)
        jax.block_until_ready(out.token)

