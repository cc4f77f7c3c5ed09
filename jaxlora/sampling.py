"""Per-request sampling: parameters, their validation, and the batched sampler that runs on device.

Every row of a batch carries its own temperature, top-k, top-p and seed. The random key of a row's
i-th generated token is `fold_in(key(seed), i)`, a function of that row alone, so a request draws
the same tokens whether it runs alone or anywhere in a busy batch. Temperature 0 is greedy.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits, before
temperature, top-k or top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlora.errors import JaxLoraError

MAX_LOGPROBS = 5
MAX_TOP_K = 256  # top_k above this is refused: the sampler keeps at most this many candidates
MAX_SEED = 2**63 - 1


class InvalidRequest(JaxLoraError):
    """A request the engine refuses as given (HTTP 400); the message names the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # None: the engine picks one and reports it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0..5: the chosen token's plus this many alternatives

    def validate(self) -> "SamplingParams":
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"invalid {param}: {why}", param=param)

        def number(param: str, value, kind=(int, float)) -> None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise bad(param, f"expected a number, got {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(param, f"must be finite, got {value}")

        number("max_tokens", self.max_tokens, int)
        if self.max_tokens < 1:
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
        if self.logprobs is not None:
            number("logprobs", self.logprobs, int)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        for t in self.stop_token_ids:
            number("stop_token_ids", t, int)
        return self


def row_key(seed_hi: jax.Array, seed_lo: jax.Array, index: jax.Array) -> jax.Array:
    """The PRNG key of one row's `index`-th generated token: depends on nothing else."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed_lo), seed_hi)
    return jax.random.fold_in(key, index)


def split_seed(seed: int) -> tuple[int, int]:
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


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


def _sampled_tokens(scaled_BxV, temperature_B, top_k_B, top_p_B, seed_hi_B, seed_lo_B, index_B, greedy_B):
    V = scaled_BxV.shape[-1]

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
    keys = jax.vmap(row_key)(seed_hi_B, seed_lo_B, index_B)
    gumbel_BxV = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
    sampled_B = jnp.argmax(masked_BxV + gumbel_BxV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def sample(
    logits_BxV: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    seed_hi_B: jax.Array,
    seed_lo_B: jax.Array,
    index_B: jax.Array,
    want_logprobs_B: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Returns (token [B], its logprob [B], top-5 token ids [B, 5], their logprobs [B, 5]).

    Each stage runs only when some row of the batch needs it (`lax.cond` on the batch): the random
    draw when a row samples, top-k (`lax.top_k` over at most MAX_TOP_K candidates) when a row sets
    top_k, the full sort for top-p when a row sets top_p < 1, log-probabilities when a row asks for
    them. A stage gives a row that does not use it exactly what skipping it gives, so a row's
    output never depends on what its neighbours asked for. Logprobs are zeros for rows that did
    not ask.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    token_B = jax.lax.cond(
        jnp.any(temperature_B > 0),
        lambda: _sampled_tokens(scaled_BxV, temperature_B, top_k_B, top_p_B, seed_hi_B, seed_lo_B, index_B, greedy_B),
        lambda: greedy_B,
    )

    def logprobs():
        logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
        token_logprob_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
        top_logprobs_Bx5, top_ids_Bx5 = jax.lax.top_k(logprobs_BxV, MAX_LOGPROBS)
        return token_logprob_B, top_ids_Bx5.astype(jnp.int32), top_logprobs_Bx5

    def no_logprobs():
        B = token_B.shape[0]
        return (jnp.zeros((B,), jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((B, MAX_LOGPROBS), jnp.float32))

    token_logprob_B, top_ids_Bx5, top_logprobs_Bx5 = jax.lax.cond(jnp.any(want_logprobs_B), logprobs, no_logprobs)
    return token_B, token_logprob_B, top_ids_Bx5, top_logprobs_Bx5
