"""Reversible residual sequences whose backward recomputes inputs from outputs (RevNet coupling).

Gomez et al., "The Reversible Residual Network", https://arxiv.org/abs/1707.04585, as used by
Pendse et al.'s memory-efficient 3-D U-Net (arXiv 2009.06835, paper 4). The channels are split
``x = [x1, x2]`` and every block ``i`` applies the additive coupling

    y1 = x1 + F_i(x2),    y2 = x2 + G_i(y1),

which is inverted exactly (up to rounding) by ``x2 = y2 − G_i(y1)``, ``x1 = y1 − F_i(x2)``.
`reversible_sequence` is a `jax.custom_vjp` whose forward keeps only the last block's outputs
and whose backward walks the blocks in reverse, reconstructing each block's inputs from its
outputs and taking the VJPs of F_i and G_i there: activation memory independent of the number
of blocks, at the price of one extra forward of F and G per block.

F and G must be deterministic functions of their parameters and input (no dropout, no batch
statistics: a BatchNorm in training mode normalises with the batch and updates running
statistics, which the reconstruction cannot undo; use per-example norms such as GroupNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["reversible_sequence", "reversible_inverse", "plain_sequence"]

Apply = Callable[[Any, jax.Array], jax.Array]


def plain_sequence(
    f: Apply, g: Apply, f_params: Sequence[Any], g_params: Sequence[Any], x1, x2
) -> tuple[jax.Array, jax.Array]:
    """The same coupling with ordinary autodiff (stores every block's activations)."""
    for fp, gp in zip(f_params, g_params, strict=True):
        x1 = x1 + f(fp, x2)
        x2 = x2 + g(gp, x1)
    return x1, x2


def reversible_inverse(
    f: Apply, g: Apply, f_params: Sequence[Any], g_params: Sequence[Any], y1, y2
) -> tuple[jax.Array, jax.Array]:
    """Inputs ``(x1, x2)`` of the sequence from its outputs (blocks undone in reverse)."""
    for fp, gp in zip(reversed(tuple(f_params)), reversed(tuple(g_params)), strict=True):
        y2 = y2 - g(gp, y1)
        y1 = y1 - f(fp, y2)
    return y1, y2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def reversible_sequence(
    f: Apply, g: Apply, f_params: tuple, g_params: tuple, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(y1, y2)`` of the coupled blocks; the backward stores no intermediate activation.

    Args:
      f, g: ``fn(params, x) -> same shape as x`` (static: hashable, e.g. a module's ``apply``
        wrapped once).
      f_params, g_params: tuples of per-block parameter pytrees (equal lengths).
      x1, x2: the two channel halves (equal shapes).

    Example::

        y1, y2 = reversible_sequence(F, G, (fp1, fp2), (gp1, gp2), x1, x2)
    """
    if len(f_params) != len(g_params):
        raise ValueError(f"reversible_sequence: {len(f_params)} F blocks but {len(g_params)} G")
    if x1.shape != x2.shape:
        raise ValueError(f"reversible_sequence: x1 {x1.shape} and x2 {x2.shape} must match")
    return plain_sequence(f, g, f_params, g_params, x1, x2)


def _fwd(f, g, f_params, g_params, x1, x2):
    y1, y2 = reversible_sequence(f, g, f_params, g_params, x1, x2)
    return (y1, y2), (f_params, g_params, y1, y2)  # outputs only: no per-block activation


def _bwd(f, g, res, cts):
    f_params, g_params, y1, y2 = res
    dy1, dy2 = cts
    dfs, dgs = [], []
    for fp, gp in zip(reversed(f_params), reversed(g_params), strict=True):
        # undo y2 = x2 + G(y1): G's VJP at y1, then x2
        g_out, g_vjp = jax.vjp(g, gp, y1)
        dgp, dy1_from_g = g_vjp(dy2)
        x2 = y2 - g_out
        dz = dy1 + dy1_from_g  # total cotangent of y1 (= of x1 + F(x2))
        # undo y1 = x1 + F(x2): F's VJP at the reconstructed x2, then x1
        f_out, f_vjp = jax.vjp(f, fp, x2)
        dfp, dx2_from_f = f_vjp(dz)
        x1 = y1 - f_out
        dy1, dy2 = dz, dy2 + dx2_from_f  # cotangents of this block's inputs
        # The barrier releases the reconstructed inputs only with this block's cotangents, so
        # XLA cannot hoist the next block's recomputation (and keep every block's activations
        # alive at once, which would undo the memory saving).
        y1, y2, dy1, dy2 = jax.lax.optimization_barrier((x1, x2, dy1, dy2))
        dfs.append(dfp)
        dgs.append(dgp)
    return tuple(reversed(dfs)), tuple(reversed(dgs)), dy1, dy2


reversible_sequence.defvjp(_fwd, _bwd)


def split_channels(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Halves of the last axis (which must be even)."""
    c = x.shape[-1]
    if c % 2:
        raise ValueError(f"reversible coupling: channels must be even, got shape {x.shape}")
    return x[..., : c // 2], x[..., c // 2 :]


def merge_channels(x1: jax.Array, x2: jax.Array) -> jax.Array:
    return jnp.concatenate([x1, x2], axis=-1)
