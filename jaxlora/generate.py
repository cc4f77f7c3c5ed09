"""Greedy batched generation over the model's prefill and decode paths.

The smallest loop that turns prompts into tokens: one prefill of the right-padded prompts, then one
decode step per new token, each a jitted call with the KV cache donated. It has no sampling, no
stop conditions and no scheduling; it exists for the demo command and as the plain reference the
batching engine is checked against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.model import KVCache, Params, forward


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _forward_step(params: Params, tokens_BxT, positions_BxT, cache: KVCache, cfg: ModelConfig):
    return forward(params, tokens_BxT, positions_BxT, cfg, cache)


def greedy_generate(
    params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Returns `max_new_tokens` argmax tokens for each prompt (no early stop at EOS). With
    `cfg.decode_kernels` the decode steps (not the prefill) run through the CPU kernels (`kernels`)."""
    lens_B = np.array([len(p) for p in prompts], np.int32)
    if lens_B.min() < 1:
        raise ValueError("every prompt needs at least one token")
    B, T = len(prompts), int(lens_B.max())
    tokens_BxT = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens_BxT[b, : len(p)] = p
    positions_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    cache = KVCache.zeros(cfg, B, T + max_new_tokens, dtype=params.embed.dtype)
    prefill_cfg = dataclasses.replace(cfg, decode_kernels=False)  # the kernels take decode steps only
    logits_BxTxV, cache = _forward_step(params, tokens_BxT, positions_BxT, cache, prefill_cfg)
    next_B = jnp.argmax(logits_BxTxV[jnp.arange(B), lens_B - 1], axis=-1)
    out = []
    for i in range(max_new_tokens):
        out.append(next_B)
        if i + 1 == max_new_tokens:
            break
        logits_Bx1xV, cache = _forward_step(params, next_B[:, None], (lens_B + i)[:, None], cache, cfg)
        next_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1)
    tokens_BxN = np.asarray(jnp.stack(out, axis=1))
    return [row.tolist() for row in tokens_BxN]
