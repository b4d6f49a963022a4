"""Block-causal attention for semi-autoregressive generation — Ren et al., "Next Block
Prediction: Video Generation via Semi-Autoregressive Modeling", https://arxiv.org/abs/2502.07737
(official code: RenShuhuai-Andy/NBP, ``nbp/lm_transformer.py::get_attn_mask``).

The sequence is a condition prefix followed by video tokens grouped into blocks of
``block_size`` tokens. Attention is bidirectional inside a block and causal across blocks, so
one decoding step emits a whole block; each token of block b is trained to predict the token at
the same place in block b + 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

__all__ = ["block_causal_mask", "next_block_inputs_targets"]


def _check_int(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def block_causal_mask(seq_len: int, prefix_len: int, block_size: int) -> Bool[np.ndarray, "T T"]:
    """``[seq_len, seq_len]`` boolean mask, True where query row i may attend to key column j.

    Prefix tokens (the first ``prefix_len``) see the whole prefix, both ways, and no video
    token. Video tokens see the whole prefix and every video token up to the end of their own
    block; blocks are counted from ``prefix_len`` and the last one may be shorter. With
    ``block_size=1`` the video part is the ordinary causal mask.

    Example:
      >>> block_causal_mask(5, 1, 2).astype(int)
      array([[1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0],
             [1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1],
             [1, 1, 1, 1, 1]])
    """
    fn = "block_causal_mask"
    seq_len = _check_int(fn, "seq_len", seq_len, 0)
    prefix_len = _check_int(fn, "prefix_len", prefix_len, 0)
    block_size = _check_int(fn, "block_size", block_size, 1)
    if prefix_len > seq_len:
        raise ValueError(f"{fn}: prefix_len={prefix_len} exceeds seq_len={seq_len}")
    pos = np.arange(seq_len)
    video = pos >= prefix_len
    # index of the last position of each token's block (prefix tokens: their own position)
    block_end = np.where(
        video, prefix_len + ((pos - prefix_len) // block_size + 1) * block_size - 1, pos
    )
    sees_prefix = ~video[None, :]
    sees_video = video[:, None] & video[None, :] & (pos[None, :] <= block_end[:, None])
    return sees_prefix | sees_video


def next_block_inputs_targets(
    tokens: Int[Array, "B N"], block_size: int, *, bov_token: int | None = None
) -> tuple[Array, Array]:
    """Inputs and targets of the next-block objective over video tokens ``[B, N]``.

    Without ``bov_token``: inputs are ``tokens[:, :-k]`` and targets ``tokens[:, k:]`` (the
    first block is only context). With it (the official ``starts_with_bov``), a block of ``k``
    begin-of-video tokens is prepended, inputs are ``[bov]*k + tokens[:, :-k]`` and every token
    is a target. Position t of the inputs predicts position t of the targets: the token at the
    same place in the next block.
    """
    fn = "next_block_inputs_targets"
    k = _check_int(fn, "block_size", block_size, 1)
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"{fn}: tokens must be [B, N], got {getattr(tokens, 'shape', tokens)}")
    n = tokens.shape[1]
    if bov_token is None:
        if n <= k:
            raise ValueError(f"{fn}: {n} tokens leave no target after the first block of {k}")
        return tokens[:, :-k], tokens[:, k:]
    bov = jnp.full((tokens.shape[0], k), bov_token, dtype=tokens.dtype)
    inputs = jnp.concatenate([bov, jnp.asarray(tokens)[:, : n - k]], axis=1)
    return inputs, tokens
