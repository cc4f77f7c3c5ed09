"""Losses as pure functions of (logits, batch): masked cross-entropy for SFT, and DPO.

DPO (Rafailov et al. 2023), with the base model as the reference policy:
    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
where pi_x / ref_x are the summed log-probabilities of the response tokens of the chosen (c) and
rejected (r) sequences under the adapter and under the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def sft_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over the trained tokens of the whole batch (as transformers)."""
    nll = -token_logprobs(logits_BxTxV, targets_BxT) * mask_BxT
    return nll.sum() / jnp.maximum(mask_BxT.sum(), 1.0)


def sequence_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    return (token_logprobs(logits_BxTxV, targets_BxT) * mask_BxT).sum(axis=-1)


def dpo_loss(policy_2B: jax.Array, reference_2B: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs of [chosen..., rejected...]; returns (mean loss, reward accuracy)."""
    B = policy_2B.shape[0] // 2
    margin = (policy_2B[:B] - reference_2B[:B]) - (policy_2B[B:] - reference_2B[B:])
    return -jax.nn.log_sigmoid(beta * margin).mean(), (margin > 0).mean()
