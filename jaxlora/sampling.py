"""Per-request sampling: parameters, their validation, and the batched sampler that runs on device.

Every row of a batch carries its own parameters (`RowSampling`, fixed-shape arrays) and its own
token history (`TokenHistory`: counts of the tokens it generated, the tokens of its prompt). The
random key of a row's i-th generated token is `fold_in(key(seed), i)`, a function of that row
alone, so a request draws the same tokens whether it runs alone or anywhere in a busy batch.

The stages, in vLLM's order; each sees the output of the one before:
  0. a row with a grammar has every token its mask forbids set to -inf (`allowed_only`, applied
     by the engine before `sample`: the logprobs reported are then of the allowed tokens);
  1. logit_bias: bias[t] added to logit t (OpenAI; +-100 forces or bans a token);
  2. repetition_penalty (vLLM / transformers): every token of the prompt or generated so far has
     its logit divided by the penalty if positive, multiplied by it if not;
  3. frequency and presence penalties (OpenAI): logit t minus `frequency * count[t]` and minus
     `presence * (count[t] > 0)`, counts over the tokens the request generated (not the prompt);
  4. greedy (temperature 0) takes the argmax here; sampling divides by the temperature,
  5. drops tokens whose probability is below `min_p` times the largest (vLLM),
  6. applies top-k and top-p to what is left, and draws with the row's key (Gumbel-max).
Log-probabilities are those of the model's own distribution: log-softmax of the logits `sample` is
given, before any stage from 1 on (vLLM's default `raw_logprobs`; for a row with a grammar, after its
mask, stage 0). A request with logit_bias or penalties can so
report a chosen token that is not the most likely alternative.

What it deliberately does not do: know the vocabulary (a logit_bias id past it is refused where
the vocabulary is known, the scheduler's `submit`), stop conditions, or tokenization.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import InvalidRequest

MAX_LOGPROBS = 5
MAX_TOP_K = 256  # top_k above this is refused: the sampler keeps at most this many candidates
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit): the fixed width of the per-row bias arrays
MAX_REPETITION_PENALTY = 10.0
_DROPPED_ID = np.iinfo(np.int32).max  # a token id past every vocabulary: scatters drop it (bias and prompt padding)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: as many as the context has room for after the prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # None: the engine picks one and reports it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0..5: the chosen token's plus this many alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs, each id once
    presence_penalty: float = 0.0  # [-2, 2]: minus this for every token generated at least once
    frequency_penalty: float = 0.0  # [-2, 2]: minus this times how often a token was generated
    repetition_penalty: float = 1.0  # (0, 10]: 1 = off; divides (or multiplies) logits of prompt and generated tokens
    min_p: float = 0.0  # [0, 1]: 0 = off; sampling drops tokens below min_p * the top probability
    n: int = 1  # choices (each its own row and random stream, `choice_seed`; the prompt prefilled once)
    prompt_logprobs: int | None = None  # None: none; 0..5: each prompt token's logprob and this many alternatives

    def validate(self) -> "SamplingParams":
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"invalid {param}: {why}", param=param)

        def number(param: str, value, kind=(int, float)) -> None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise bad(param, f"expected a number, got {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(param, f"must be finite, got {value}")

        if self.max_tokens is not None:
            number("max_tokens", self.max_tokens, int)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        number("temperature", self.temperature)
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be between 0 and 100, got {self.temperature}")
        number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        number("top_k", self.top_k, int)
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be 0 (off) or between 1 and {MAX_TOP_K}, got {self.top_k}")
        if self.seed is not None:
            number("seed", self.seed, int)
            if not 0 <= self.seed <= MAX_SEED:
                raise bad("seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        for param in ("logprobs", "prompt_logprobs"):
            if getattr(self, param) is not None:
                number(param, getattr(self, param), int)
                if not 0 <= getattr(self, param) <= MAX_LOGPROBS:
                    raise bad(param, f"must be between 0 and {MAX_LOGPROBS}, got {getattr(self, param)}")
        number("n", self.n, int)
        if self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}")
        for t in self.stop_token_ids:
            number("stop_token_ids", t, int)
        for param, low, high in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0), ("min_p", 0.0, 1.0)):
            number(param, getattr(self, param))
            if not low <= getattr(self, param) <= high:
                raise bad(param, f"must be between {low:g} and {high:g}, got {getattr(self, param)}")
        number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), got {self.repetition_penalty}")
        if not isinstance(self.logit_bias, tuple):
            raise bad("logit_bias", f"expected a tuple of (token id, bias) pairs, got {type(self.logit_bias).__name__}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for entry in self.logit_bias:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise bad("logit_bias", f"expected (token id, bias) pairs, got {entry!r}")
            token, bias = entry
            number("logit_bias", token, int)
            number("logit_bias", bias)
            if token < 0:
                raise bad("logit_bias", f"token ids must be >= 0, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"bias of token {token} must be between -100 and 100, got {bias}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise bad("logit_bias", "each token id may appear once")
        return self


def row_key(seed_hi: jax.Array, seed_lo: jax.Array, index: jax.Array) -> jax.Array:
    """The PRNG key of one row's `index`-th generated token: depends on nothing else."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed_lo), seed_hi)
    return jax.random.fold_in(key, index)


def choice_seed(seed: int, choice: int) -> int:
    """The seed of a request's choice `choice` (of `n`): the request's own for choice 0, else a
    splitmix64 mix of (seed, choice), so every choice has its own random stream and a seeded
    request draws the same choices whatever runs beside it."""
    if choice == 0:
        return seed
    z = (seed + choice * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & MAX_SEED


def split_seed(seed: int) -> tuple[int, int]:
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling parameters, one entry per row; every field has the same shape for any request."""

    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32
    seed_hi: jax.Array  # [B] uint32
    seed_lo: jax.Array  # [B] uint32
    want_logprobs: jax.Array  # [B] bool
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32; a row's entries first, then _DROPPED_ID
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] float32; 0 past a row's entries
    repetition_penalty: jax.Array  # [B] float32; 1 = off
    frequency_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32; 0 = off

    @classmethod
    def of(cls, items: list[tuple[SamplingParams, int]]) -> "RowSampling":
        """One row per (params, seed)."""
        seeds = [split_seed(seed) for _, seed in items]
        bias_ids = np.full((len(items), MAX_LOGIT_BIAS), _DROPPED_ID, np.int32)
        bias_values = np.zeros((len(items), MAX_LOGIT_BIAS), np.float32)
        for row, (p, _) in enumerate(items):
            for i, (token, bias) in enumerate(p.logit_bias):
                bias_ids[row, i], bias_values[row, i] = token, bias

        def per_row(field, dtype):
            return jnp.array([getattr(p, field) for p, _ in items], dtype)

        return cls(
            temperature=per_row("temperature", jnp.float32),
            top_k=per_row("top_k", jnp.int32),
            top_p=per_row("top_p", jnp.float32),
            seed_hi=jnp.array([hi for hi, _ in seeds], jnp.uint32),
            seed_lo=jnp.array([lo for _, lo in seeds], jnp.uint32),
            want_logprobs=jnp.array([p.logprobs is not None for p, _ in items], jnp.bool_),
            bias_ids=jnp.array(bias_ids),
            bias_values=jnp.array(bias_values),
            repetition_penalty=per_row("repetition_penalty", jnp.float32),
            frequency_penalty=per_row("frequency_penalty", jnp.float32),
            presence_penalty=per_row("presence_penalty", jnp.float32),
            min_p=per_row("min_p", jnp.float32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenHistory:
    """What the penalties read, per row, over the whole vocabulary (fixed shapes, no recompiles).

    Counts are kept only of generated tokens (presence and frequency penalise those alone) and the
    prompt is kept as a mask (the repetition penalty also covers it). The count dtype is chosen
    by the engine from its longest sequence (`count_dtype`): uint16 up to 65535 tokens, so with
    the mask a row costs 3 bytes per vocabulary entry, 1.5 MiB for B=16 at V=32k.
    """

    generated: jax.Array  # [B, V] uint16 (or int32): how often the row has generated each token
    in_prompt: jax.Array  # [B, V] bool: the token occurs in the row's prompt

    @classmethod
    def of_prompts(cls, tokens_BxT: jax.Array, true_len_B: jax.Array, vocab: int, count_dtype) -> "TokenHistory":
        """Rows whose prompts are the first true_len_B[b] tokens of tokens_BxT; nothing generated yet."""
        B, T = tokens_BxT.shape
        ids_BxT = jnp.where(jnp.arange(T)[None, :] < true_len_B[:, None], tokens_BxT, _DROPPED_ID)  # padding: dropped
        rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        in_prompt = jnp.zeros((B, vocab), jnp.bool_).at[rows_BxT, ids_BxT].set(True, mode="drop")
        return cls(generated=jnp.zeros((B, vocab), count_dtype), in_prompt=in_prompt)

    def add(self, token_B: jax.Array) -> "TokenHistory":
        """The history after each row generated token_B[b]."""
        B = token_B.shape[0]
        return dataclasses.replace(self, generated=self.generated.at[jnp.arange(B), token_B].add(1))


def count_dtype(max_seq_len: int):
    """The narrowest count dtype that holds a row's longest run of one token (< max_seq_len)."""
    return jnp.uint16 if max_seq_len <= 2**16 else jnp.int32


def _logit_bias(logits_BxV: jax.Array, s: RowSampling) -> jax.Array:
    rows_BxN = jnp.broadcast_to(jnp.arange(logits_BxV.shape[0])[:, None], s.bias_ids.shape)
    return logits_BxV.at[rows_BxN, s.bias_ids].add(s.bias_values, mode="drop")  # ids are unique per row (validate)


def _repetition_penalty(logits_BxV: jax.Array, s: RowSampling, history: TokenHistory) -> jax.Array:
    seen_BxV = history.in_prompt | (history.generated > 0)
    penalty_Bx1 = s.repetition_penalty[:, None]
    penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / penalty_Bx1, logits_BxV * penalty_Bx1)
    return jnp.where(seen_BxV & (penalty_Bx1 != 1.0), penalized_BxV, logits_BxV)


def _frequency_presence_penalty(logits_BxV: jax.Array, s: RowSampling, history: TokenHistory) -> jax.Array:
    count_BxV = history.generated.astype(jnp.float32)
    penalized_BxV = (logits_BxV - s.frequency_penalty[:, None] * count_BxV
                     - s.presence_penalty[:, None] * (count_BxV > 0).astype(jnp.float32))
    uses_B = (s.frequency_penalty != 0.0) | (s.presence_penalty != 0.0)
    return jnp.where(uses_B[:, None], penalized_BxV, logits_BxV)


def _min_p(scaled_BxV: jax.Array, min_p_B: jax.Array) -> jax.Array:
    """p < min_p * p_max, in log space: scaled - max < log(min_p); min_p = 0 keeps everything."""
    threshold_Bx1 = jnp.max(scaled_BxV, axis=-1, keepdims=True) + jnp.log(min_p_B)[:, None]
    return jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, -jnp.inf)


def allowed_only(logits_BxV: jax.Array, mask_BxW: jax.Array, constrained_B: jax.Array) -> jax.Array:
    """The logits with every token a constrained row's bitmask (`grammar.BatchMasks`: bit t of word
    t // 32) does not allow set to -inf; rows not constrained are returned as they are (bit for bit:
    a select, no arithmetic). Skipped when no row is constrained."""

    def masked(x):
        B, V = x.shape
        bits_BxV = (mask_BxW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)).reshape(B, -1)[:, :V] & 1
        return jnp.where(constrained_B[:, None] & (bits_BxV == 0), -jnp.inf, x)

    return _stage(constrained_B, masked, logits_BxV)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the largest value) as two plain reductions,
    a max and then a min over the indices that reach it: XLA:CPU runs argmax's (value, index) reduce
    one element at a time, 3x slower over a 49152-token vocabulary (docs/benchmarks.md, bench.step).
    A row holding NaN, which argmax would point at, gets its last index instead."""
    V = x_BxV.shape[-1]
    top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(x_BxV == top_Bx1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first_B, V - 1)


def _stage(needed_B: jax.Array, fn, x):
    """fn(x) if some row needs it, else x: a stage runs only for batches that use it."""
    return jax.lax.cond(jnp.any(needed_B), fn, lambda x: x, x)


def _top_p_cutoff(scaled_BxV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """The smallest scaled logit inside each row's nucleus (the shortest prefix of the sorted
    tokens, after the top-k cut, whose probability reaches top_p); -inf for rows with top_p = 1."""
    V = scaled_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    in_top_k_BxV = jnp.arange(V)[None, :] < k_B[:, None]
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = in_top_k_BxV & (mass_before_BxV < top_p_B[:, None])
    cutoff_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(top_p_B < 1.0, cutoff_B, -jnp.inf)


def _sampled_tokens(scaled_BxV, s: RowSampling, index_B, greedy_B):
    V = scaled_BxV.shape[-1]
    top_k_B, top_p_B = s.top_k, s.top_p
    scaled_BxV = _stage(s.min_p > 0.0, lambda x: _min_p(x, s.min_p), scaled_BxV)

    def kth_largest():
        top_vals_BxK, _ = jax.lax.top_k(scaled_BxV, min(MAX_TOP_K, V))
        k_B = jnp.clip(top_k_B, 1, top_vals_BxK.shape[1])
        kth_B = jnp.take_along_axis(top_vals_BxK, (k_B - 1)[:, None], axis=-1)[:, 0]
        return jnp.where(top_k_B > 0, kth_B, -jnp.inf)

    no_cut = lambda: jnp.full(top_p_B.shape, -jnp.inf, jnp.float32)  # noqa: E731
    kth_B = jax.lax.cond(jnp.any(top_k_B > 0), kth_largest, no_cut)
    top_p_cut_B = jax.lax.cond(jnp.any(top_p_B < 1.0), lambda: _top_p_cutoff(scaled_BxV, top_k_B, top_p_B), no_cut)
    cutoff_B = jnp.maximum(kth_B, top_p_cut_B)
    masked_BxV = jnp.where(scaled_BxV >= cutoff_B[:, None], scaled_BxV, -jnp.inf)
    keys = jax.vmap(row_key)(s.seed_hi, s.seed_lo, index_B)
    gumbel_BxV = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    sampled_B = first_argmax(masked_BxV + gumbel_BxV)
    return jnp.where(s.temperature > 0, sampled_B, greedy_B)


def sample(
    logits_BxV: jax.Array, s: RowSampling, history: TokenHistory, index_B: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Returns (token [B], its logprob [B], top-5 token ids [B, 5], their logprobs [B, 5]) of the
    rows' next tokens; `history` is each row's history before this token, `index_B` its position
    in the row's generated tokens (the PRNG counter).

    Each stage runs only when some row of the batch needs it (`lax.cond` on the batch): logit
    bias, repetition penalty, frequency/presence penalties when a row sets them, the random draw
    when a row samples, min-p when a row sets it, top-k (`lax.top_k` over at most MAX_TOP_K
    candidates) when a row sets top_k, the full sort for top-p when a row sets top_p < 1,
    log-probabilities when a row asks for them. A stage gives a row that does not use it exactly
    what skipping it gives, so a row's output never depends on what its neighbours asked for.
    Logprobs are zeros for rows that did not ask.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    processed_BxV = _stage(s.bias_ids[:, 0] != _DROPPED_ID, lambda x: _logit_bias(x, s), logits_BxV)
    processed_BxV = _stage(s.repetition_penalty != 1.0, lambda x: _repetition_penalty(x, s, history), processed_BxV)
    processed_BxV = _stage((s.frequency_penalty != 0.0) | (s.presence_penalty != 0.0),
                           lambda x: _frequency_presence_penalty(x, s, history), processed_BxV)
    greedy_B = first_argmax(processed_BxV)
    scaled_BxV = processed_BxV / jnp.maximum(s.temperature, 1e-6)[:, None]
    token_B = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: _sampled_tokens(scaled_BxV, s, index_B, greedy_B),
        lambda: greedy_B,
    )

    def logprobs():
        logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
        token_logprob_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
        top_logprobs_Bx5, top_ids_Bx5 = jax.lax.top_k(logprobs_BxV, MAX_LOGPROBS)
        want_B, want_Bx1 = s.want_logprobs, s.want_logprobs[:, None]  # the others get no_logprobs' zeros
        return (jnp.where(want_B, token_logprob_B, 0.0), jnp.where(want_Bx1, top_ids_Bx5, 0).astype(jnp.int32),
                jnp.where(want_Bx1, top_logprobs_Bx5, 0.0))

    def no_logprobs():
        B = token_B.shape[0]
        return (jnp.zeros((B,), jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((B, MAX_LOGPROBS), jnp.float32))

    token_logprob_B, top_ids_Bx5, top_logprobs_Bx5 = jax.lax.cond(jnp.any(s.want_logprobs), logprobs, no_logprobs)
    return token_B, token_logprob_B, top_ids_Bx5, top_logprobs_Bx5
