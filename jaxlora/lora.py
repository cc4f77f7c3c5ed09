"""LoRA as a few pure functions: a stack of adapters with a leading slot axis, applied per row.

A `LoraStack` holds, for each decoder layer and each adapted projection, `a` [S, in, R] and
`b` [S, R, out] for S adapter slots, plus `scale` [S]. Every row of a batch carries the slot it
uses; one call computes every row's delta at once, the JAX form of Punica's BGMV. Semantics:

    for i in range(batch):
        s = slots[i]
        y[i] = x[i] @ W + scale[s] * ((x[i] @ a[s]) @ b[s])

Adapters of lower rank are zero-padded to R (the extra rank columns contribute exact zeros), and
projections an adapter does not target are zero in its slot. Who owns which slot (slot 0 = base
model, all zeros, in serving) is the slot manager's business, not this module's; training uses a
one-slot stack whose slot 0 is the adapter being trained.

`scale` is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (see `lora_scale`). `b` is kept
unscaled so that the arrays are exactly PEFT's (transposed) and gradients match PEFT's.

This module is array math only: which projections exist and their shapes are the model's
(`model.PROJECTIONS`), and the decode step's C++ kernel is chosen in `model.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraModule:
    a: jax.Array  # [S, in, R]
    b: jax.Array  # [S, R, out]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    layers: tuple[dict[str, LoraModule], ...]  # per layer: PEFT module name -> slots of that projection
    scale: jax.Array  # [S] float32

    @property
    def num_slots(self) -> int:
        return self.scale.shape[0]

    @property
    def max_rank(self) -> int:
        return next(iter(self.layers[0].values())).a.shape[-1]

    @property
    def dtype(self):
        return next(iter(self.layers[0].values())).a.dtype


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def zeros_stack(shapes: Sequence[Mapping[str, tuple[int, int]]], num_slots: int, max_rank: int,
                dtype=jnp.float32) -> LoraStack:
    """An all-zero stack; `shapes` holds, per layer, (in, out) of each projection (`model.lora_shapes`)."""
    def zeros(d_in: int, d_out: int) -> LoraModule:
        return LoraModule(a=jnp.zeros((num_slots, d_in, max_rank), dtype), b=jnp.zeros((num_slots, max_rank, d_out), dtype))

    layers = tuple({m: zeros(d_in, d_out) for m, (d_in, d_out) in layer.items()} for layer in shapes)
    return LoraStack(layers=layers, scale=jnp.zeros((num_slots,), jnp.float32))


def lora_delta(x_BxTxD: jax.Array, mod: LoraModule, scale_S: jax.Array, slots_B: jax.Array | None) -> jax.Array:
    """scale[slot] * (x @ a[slot]) @ b[slot] for each row, gathered by the row's slot.

    With `slots_B=None` the stack is already per row (see `gather_rows`): row b uses entry b.
    Two forms of the same product: a one-slot stack (training) takes plain matmuls with a
    hand-written gradient; everything else, XLA's batched matmuls over each row's gathered adapter.
    (Decode steps on CPU take a third, the C++ kernel `kernels.bgmv`, chosen in `model.py`.)
    """
    if slots_B is not None and mod.a.shape[0] == 1:  # one slot (training): every row uses it
        x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).astype(mod.a.dtype)
        y_NxO = _one_slot_delta(x_NxD, mod.a[0], mod.b[0], scale_S[0].astype(mod.a.dtype))
        return y_NxO.reshape(*x_BxTxD.shape[:-1], -1).astype(x_BxTxD.dtype)
    if slots_B is None:
        a_BxDxR, b_BxRxO, scale_B = mod.a, mod.b, scale_S
    else:
        a_BxDxR, b_BxRxO, scale_B = mod.a[slots_B], mod.b[slots_B], scale_S[slots_B]
    xa_BxTxR = jnp.einsum("btd,bdr->btr", x_BxTxD.astype(a_BxDxR.dtype), a_BxDxR)
    xa_BxTxR = xa_BxTxR * scale_B[:, None, None].astype(xa_BxTxR.dtype)
    return jnp.einsum("btr,bro->bto", xa_BxTxR, b_BxRxO).astype(x_BxTxD.dtype)


@jax.custom_vjp
def _one_slot_delta(x_NxD: jax.Array, a_DxR: jax.Array, b_RxO: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * (x @ a) @ b for one adapter. Its gradient is written out so that every transpose
    falls on a rank-sized array: XLA's own derivative of `x @ a` transposes the [N, D] input."""
    return ((x_NxD @ a_DxR) * scale) @ b_RxO


def _one_slot_fwd(x_NxD, a_DxR, b_RxO, scale):
    xa_NxR = x_NxD @ a_DxR
    return (xa_NxR * scale) @ b_RxO, (x_NxD, a_DxR, b_RxO, scale, xa_NxR)


def _one_slot_bwd(res, g_NxO):
    x_NxD, a_DxR, b_RxO, scale, xa_NxR = res
    g_NxR = g_NxO @ b_RxO.T  # d(scaled xa)
    d_b = (xa_NxR * scale).T @ g_NxO
    d_xa_NxR = g_NxR * scale
    d_a = (d_xa_NxR.T @ x_NxD).T
    d_x = d_xa_NxR @ a_DxR.T
    d_scale = jnp.sum(g_NxR * xa_NxR).astype(scale.dtype)
    return d_x, d_a, d_b, d_scale


_one_slot_delta.defvjp(_one_slot_fwd, _one_slot_bwd)


def gather_rows(stack: LoraStack, slots_B: jax.Array) -> LoraStack:
    """The stack re-indexed by row: entry b holds row b's adapter. Decoding gathers once per
    device call with this instead of once per step (the slots of a row do not change inside it)."""
    return jax.tree.map(lambda leaf: leaf[slots_B], stack)
