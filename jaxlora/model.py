"""The Llama-family decoder (Llama, Mistral, Qwen2) as pure functions over a params pytree.

    forward(params, tokens, positions, cfg, cache=None) -> (logits, cache)

One function serves training (no cache: causal attention inside the given rows), prefill (many
tokens per row, written into the cache at their positions) and decode (one token per row). The KV
cache is a value that goes in and comes out; callers donate it under `jit` so XLA updates it in
place. Cache index == token position, so a query at position p sees exactly the cache entries
0..p: rows can be right-padded to a common length, and whatever padding writes past a row's true
length is masked now and overwritten by that row's later decode steps.

Weights are stored `[in, out]` so every projection reads `y = x @ W`; the checkpoint loader
(`hf_checkpoint.py`) transposes Hugging Face's `[out, in]` once. `PROJECTIONS` is the one table of
the seven LoRA-able projections: their PEFT, Hugging Face and GGUF names, their `LayerParams` fields
and their shapes; the loaders, the adapter formats, training and the benchmarks read it.

A decode step's config may carry `decode_kernels`, decided once by the engine: attention and LoRA
then run through the CPU kernels (`kernels/`) instead of XLA's forms, with the same semantics.

Shape suffixes: B batch, T new tokens, S cache length, D hidden, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP width, V vocab.

What it deliberately does not do: sampling, batching policy, LoRA slot management (see the
engine and the adapter modules), or any I/O.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlora import kernels
from jaxlora.config import ModelConfig
from jaxlora.lora import LoraModule, LoraStack, lora_delta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, N*H]
    wk: jax.Array  # [D, K*H]
    wv: jax.Array  # [D, K*H]
    wo: jax.Array  # [N*H, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]
    bq: jax.Array | None = None  # [N*H] (Qwen2, Llama attention_bias)
    bk: jax.Array | None = None  # [K*H]
    bv: jax.Array | None = None  # [K*H]
    bo: jax.Array | None = None  # [D] (Llama attention_bias)
    b_gate: jax.Array | None = None  # [F] (Llama mlp_bias)
    b_up: jax.Array | None = None  # [F]
    b_down: jax.Array | None = None  # [D]


@dataclasses.dataclass(frozen=True)
class Projection:
    """One LoRA-able linear layer of a decoder layer, under every name it goes by."""

    name: str  # PEFT's module name, also the last part of its Hugging Face name
    block: str  # the submodule it lives in, "self_attn" or "mlp" (in Hugging Face and PEFT names)
    gguf: str  # its name under `blk.{i}.` in a GGUF file (llama.cpp's names)
    weight: str  # LayerParams field of its weight [in, out]
    bias: str  # LayerParams field of its bias [out], which exists when the config's `bias_flag` is set
    bias_flag: str  # the ModelConfig flag that gives it a bias
    d_in: str  # the ModelConfig size of its input
    d_out: str  # the ModelConfig size of its output

    @property
    def hf_path(self) -> str:
        """Its module under `model.layers.{i}.`: Hugging Face's tensors and PEFT's adapters both use it."""
        return f"{self.block}.{self.name}"

    def shape(self, cfg: ModelConfig) -> tuple[int, int]:
        """(in, out): the shape of its weight here, and LoRA's a [in, r] and b [r, out] have them."""
        return getattr(cfg, self.d_in), getattr(cfg, self.d_out)

    def has_bias(self, cfg: ModelConfig) -> bool:
        return getattr(cfg, self.bias_flag)


PROJECTIONS: dict[str, Projection] = {p.name: p for p in (
    #          name         block        gguf           weight    bias      bias_flag         d_in                 d_out
    Projection("q_proj",    "self_attn", "attn_q",      "wq",     "bq",     "attention_bias", "hidden_size",       "q_size"),
    Projection("k_proj",    "self_attn", "attn_k",      "wk",     "bk",     "attention_bias", "hidden_size",       "kv_size"),
    Projection("v_proj",    "self_attn", "attn_v",      "wv",     "bv",     "attention_bias", "hidden_size",       "kv_size"),
    Projection("o_proj",    "self_attn", "attn_output", "wo",     "bo",     "o_bias",         "q_size",            "hidden_size"),
    Projection("gate_proj", "mlp",       "ffn_gate",    "w_gate", "b_gate", "mlp_bias",       "hidden_size",       "intermediate_size"),
    Projection("up_proj",   "mlp",       "ffn_up",      "w_up",   "b_up",   "mlp_bias",       "hidden_size",       "intermediate_size"),
    Projection("down_proj", "mlp",       "ffn_down",    "w_down", "b_down", "mlp_bias",       "intermediate_size", "hidden_size"),
)}


def lora_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, int]], ...]:
    """Per layer, (in, out) of every projection: the shapes `lora.zeros_stack` allocates for."""
    return tuple({name: p.shape(cfg) for name, p in PROJECTIONS.items()} for _ in range(cfg.num_layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to `embed`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values; entry s of a row holds the token at position s.

    Heads come before positions, [B, K, S, H]: attention's two products are batched over (row, kv
    head), and XLA on CPU wants batch dimensions leading. With [B, S, K, H] it transposed the whole
    cache of every layer on every decode step, which cost more than the products themselves."""

    k: tuple[jax.Array, ...]  # L x [B, K, S, H]
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with Llama 3's piecewise wavelength scaling when configured."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    if rs.rope_type != "llama3":
        return inv_freq
    low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_angles(positions_BxT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [B, T, 1, H/2], of every position: computed once, shared by all layers."""
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    return jnp.cos(angles_BxTxH2)[:, :, None, :], jnp.sin(angles_BxTxH2)[:, :, None, :]


def apply_rope(x_BxTxNxH: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates pairs (i, i + H/2), the Hugging Face "rotate_half" convention."""
    cos, sin = rope
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _RowLora:
    """The LoRA modules of one layer plus what selects a row's adapter; None means no LoRA."""

    modules: dict[str, LoraModule]
    scale_S: jax.Array
    slots_B: jax.Array | None
    dropout: tuple[jax.Array, float] | None = None  # (PRNG key of this layer, rate): training only
    kernel: bool = False  # a decode step with `cfg.decode_kernels`: the CPU BGMV kernel (`kernels.bgmv`)

    def delta(self, name: str, x: jax.Array) -> jax.Array | None:
        mod = self.modules.get(name)
        if mod is None:
            return None
        if self.dropout is not None and self.dropout[1] > 0:  # PEFT: B(A(dropout(x)))
            key, rate = self.dropout
            keep = jax.random.bernoulli(jax.random.fold_in(key, sorted(self.modules).index(name)), 1 - rate, x.shape)
            x = jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)
        if self.kernel:  # reads each row's slot in place; `lora_delta`'s XLA forms are the same product
            if self.slots_B is None:
                raise ValueError("the BGMV kernel takes one token per row and the slot stack with slots_B")
            return kernels.bgmv(x[:, 0], mod.a, mod.b, self.scale_S, self.slots_B)[:, None].astype(x.dtype)
        return lora_delta(x, mod, self.scale_S, self.slots_B)


def _project(x: jax.Array, lp: LayerParams, name: str, lora: _RowLora | None) -> jax.Array:
    """x @ W + b of projection `name` (a row of PROJECTIONS), plus the row's LoRA delta."""
    p = PROJECTIONS[name]
    y = x @ getattr(lp, p.weight)
    b = getattr(lp, p.bias)
    if b is not None:
        y = y + b
    delta = None if lora is None else lora.delta(name, x)
    return y if delta is None else y + delta


def visible(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, T, S]: whether a query at position p sees the key at position s (s <= p, and
    s > p - sliding_window when set). Computed once per forward, shared by all layers."""
    visible_BxTxS = k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
    if sliding_window is not None:
        visible_BxTxS &= k_pos_BxS[:, None, :] > q_pos_BxT[:, :, None] - sliding_window
    return visible_BxTxS


def attention(q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array, visible_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query attention, softmax in float32. The G query heads of a kv head and the T query
    positions form one [G*T, H] matrix, so both products are plain matmuls batched over (B, K)."""
    B, T, N, H = q_BxTxNxH.shape
    K, S = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
    G = N // K
    q_BxKxGTxH = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores_BxKxGTxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGTxH, k_BxKxSxH).astype(jnp.float32) / math.sqrt(H)
    scores_BxKxGxTxS = jnp.where(visible_BxTxS[:, None, None], scores_BxKxGTxS.reshape(B, K, G, T, S), -jnp.inf)
    probs_BxKxGTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxKxSxH.dtype).reshape(B, K, G * T, S)
    out_BxKxGTxH = jnp.einsum("bkqs,bksh->bkqh", probs_BxKxGTxS, v_BxKxSxH)
    return out_BxKxGTxH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _write_cache(cache_BxKxSxH: jax.Array, new_BxTxKxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """Writes each new token at its own position; positions past the cache end are dropped.
    (The indexed view `cache[rows, :, positions]` is [B, T, K, H], the new entries' shape.)"""
    rows_Bx1 = jnp.arange(cache_BxKxSxH.shape[0])[:, None]
    return cache_BxKxSxH.at[rows_Bx1, :, positions_BxT].set(new_BxTxKxH.astype(cache_BxKxSxH.dtype), mode="drop")


def decoder_layer(
    lp: LayerParams,
    x_BxTxD: jax.Array,
    positions_BxT: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    visible_BxTxS: jax.Array,
    cfg: ModelConfig,
    k_cache: jax.Array | None,
    v_cache: jax.Array | None,
    lora: _RowLora | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    B, T, _ = x_BxTxD.shape
    h = rms_norm(x_BxTxD, lp.attn_norm, cfg.rms_norm_eps)
    q = _project(h, lp, "q_proj", lora).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = _project(h, lp, "k_proj", lora).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = _project(h, lp, "v_proj", lora).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, rope)
    k = apply_rope(k, rope)
    if k_cache is None:  # attend to this call's tokens only (training, reference)
        keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    else:
        k_cache = _write_cache(k_cache, k, positions_BxT)
        v_cache = _write_cache(v_cache, v, positions_BxT)
        keys, values = k_cache, v_cache
    if cfg.decode_kernels:  # one token per row, against the cache (checked in hidden_states)
        attn = kernels.decode_attention(q[:, 0], keys, values, positions_BxT[:, 0], cfg.sliding_window)[:, None]
    else:
        attn = attention(q, keys, values, visible_BxTxS)
    x_BxTxD = x_BxTxD + _project(attn.reshape(B, T, cfg.q_size), lp, "o_proj", lora)
    h = rms_norm(x_BxTxD, lp.mlp_norm, cfg.rms_norm_eps)
    gate = _project(h, lp, "gate_proj", lora)
    up = _project(h, lp, "up_proj", lora)
    x_BxTxD = x_BxTxD + _project(jax.nn.silu(gate) * up, lp, "down_proj", lora)
    return x_BxTxD, k_cache, v_cache


def hidden_states(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    cfg: ModelConfig,
    cache: KVCache | None = None,
    lora: LoraStack | None = None,
    slots_B: jax.Array | None = None,
    lora_dropout: tuple[jax.Array, float] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """The final normed hidden states [B, T, D] and the updated cache; `forward` without the head.
    `lora_dropout` = (key, rate) drops LoRA inputs as PEFT does when training. With
    `cfg.decode_kernels` (a decode step's config, set by the engine) attention and LoRA run through
    the CPU decode kernels: one token per row against a float32 cache, float32 weights."""
    if lora is None and slots_B is not None:
        raise ValueError("slots_B without a LoRA stack")
    if cfg.decode_kernels and (cache is None or tokens_BxT.shape[1] != 1):
        raise ValueError("the decode kernels take one token per row and a KV cache")
    rope = rope_angles(positions_BxT, cfg)
    # Without a cache a row attends to this call's tokens; with one, cache entry s is position s.
    k_pos_BxS = positions_BxT if cache is None else jnp.arange(cache.max_len)[None, :]
    visible_BxTxS = None if cfg.decode_kernels else visible(positions_BxT, k_pos_BxS, cfg.sliding_window)
    x = params.embed[tokens_BxT]
    new_k, new_v = [], []
    for i, lp in enumerate(params.layers):
        k_cache = None if cache is None else cache.k[i]
        v_cache = None if cache is None else cache.v[i]
        dropout = None if lora_dropout is None else (jax.random.fold_in(lora_dropout[0], i), lora_dropout[1])
        row_lora = None if lora is None else _RowLora(lora.layers[i], lora.scale, slots_B, dropout, cfg.decode_kernels)
        x, k_cache, v_cache = decoder_layer(lp, x, positions_BxT, rope, visible_BxTxS, cfg, k_cache, v_cache, row_lora)
        new_k.append(k_cache)
        new_v.append(v_cache)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return x, (None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v)))


def lm_head(params: Params, x_BxTxD: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of final hidden states."""
    head_DxV = params.embed.T if params.lm_head is None else params.lm_head
    return (x_BxTxD @ head_DxV).astype(jnp.float32)


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    cfg: ModelConfig,
    cache: KVCache | None = None,
    lora: LoraStack | None = None,
    slots_B: jax.Array | None = None,
    lora_dropout: tuple[jax.Array, float] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Returns float32 logits [B, T, V] and the updated cache (None in, None out).

    With `lora`, row b adds the adapter in slot `slots_B[b]` to every projection it targets;
    with `lora` and no `slots_B`, `lora` is per row already (`lora.gather_rows`).
    """
    x, cache = hidden_states(params, tokens_BxT, positions_BxT, cfg, cache, lora, slots_B, lora_dropout)
    return lm_head(params, x), cache
