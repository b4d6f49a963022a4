"""Softmax self-attention with rotary positions and a functional KV cache, and its pre-LN block.

The shared base of the papers that decode with a cache: Next Block Prediction (semi-
autoregressive blocks, arXiv 2502.07737), Block Transformer (arXiv 2406.02657) and the small
softmax LMs the quantisation papers compress. The cache is an explicit value (`KVCache`), not a
Flax collection, so a decoding loop is a pure function that `jax.jit` and `lax.fori_loop` take.

A decoding call appends its ``T`` new keys and values at the cache's length and its queries
attend to every cached position and to the new chunk, all of it (``chunk_causal=False``: one
Next-Block-Prediction block, or a prefix, attends to itself both ways) or causally
(``chunk_causal=True``: a prompt prefilled for token-by-token decoding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "KVCache",
    "SelfAttention",
    "TransformerBlock",
    "apply_rope",
    "extend_kv_cache",
    "init_kv_cache",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of the positions decoded so far.

    Attributes:
      k, v: ``[B, S_max, H, D]``; positions ``>= length`` are unused.
      length: int32 scalar, the number of cached positions.
    """

    k: Array
    v: Array
    length: Array

    @property
    def max_len(self) -> int:
        return int(self.k.shape[1])


def init_kv_cache(batch: int, max_len: int, num_heads: int, head_dim: int, dtype=jnp.float32):
    """An empty `KVCache` for ``max_len`` positions."""
    z = jnp.zeros((batch, max_len, num_heads, head_dim), dtype)
    return KVCache(z, z, jnp.zeros((), jnp.int32))


def apply_rope(
    x: Float[Array, "B T H D"], positions: Int[Array, " T"], base: float = 10000.0
) -> Float[Array, "B T H D"]:
    """Rotary position embedding (Su et al., arXiv 2104.09864), half-split layout (GPT-NeoX)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"apply_rope: the head dim must be even, got x of shape {x.shape}")
    inv = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))  # [D/2]
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]  # [1, T, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def extend_kv_cache(
    where: str,
    cache: KVCache,
    x_shape: tuple[int, ...],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H D"],
    pos: Int[Array, " T"],
    mask: Bool[Array, "T T"] | None,
    chunk_causal: bool,
) -> tuple[Array, Array, Bool[Array, "T S"], KVCache]:
    """Append a chunk's keys and values at positions ``pos`` (from ``cache.length``) to
    ``cache``: ``(k_all, v_all, mask, new_cache)``, where ``mask[t, s]`` lets query ``t`` see
    every cached key and the chunk (itself causally with ``chunk_causal``, else fully). A
    ``mask`` argument is an error (the cache defines visibility); ``where`` names the caller."""
    B, T, H, D = k.shape
    if mask is not None:
        raise ValueError(f"{where}: pass either mask or cache, not both")
    if cache.k.shape[0] != B or cache.k.shape[2:] != (H, D):
        raise ValueError(f"{where}: cache of shape {cache.k.shape} does not match x {x_shape} "
                         f"with {H} heads of {D}")  # fmt: skip
    if T > cache.max_len:
        raise ValueError(f"{where}: a chunk of {T} tokens exceeds the cache's {cache.max_len}")
    start = cache.length
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0))
    key_pos = jnp.arange(cache.max_len, dtype=jnp.int32)  # [S]
    limit = pos[:, None] + 1 if chunk_causal else (start + T) * jnp.ones((T, 1), jnp.int32)
    return k_all, v_all, key_pos[None, :] < limit, KVCache(k_all, v_all, start + T)


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention with RoPE, a boolean mask and an optional `KVCache`.

    Attributes:
      num_heads, head_dim: heads and their width.
      dtype: compute dtype (None: the input's); the softmax runs in fp32.
      param_dtype: parameter storage dtype.
      act_quant: optional ``fn(x, name) -> x`` applied to every intermediate (q, k, v, scores,
        probabilities, attention output, projection output): fake quantisation of activations
        (BCT, `jaxblocks.compress.bct`); None = identity.
    """

    num_heads: int
    head_dim: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    act_quant: Any = None

    def _q(self, x, name):
        return x if self.act_quant is None else self.act_quant(x, name)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B T C"],
        *,
        mask: Bool[Array, "T S"] | None = None,
        cache: KVCache | None = None,
        chunk_causal: bool = False,
    ) -> tuple[Float[Array, "B T C"], KVCache | None]:
        """Attend; with ``cache``, append this chunk and attend to the cache and the chunk.

        Args:
          x: ``[B, T, C]``.
          mask: without a cache, ``[T, T]`` (True = may attend); None = full attention.
          cache: decoding state; ``mask`` must be None then (the cache defines visibility).
          chunk_causal: with a cache, the chunk attends to itself causally, else fully.

        Returns:
          ``(y, new_cache)`` (``new_cache`` None without a cache).
        """
        if x.ndim != 3:
            raise ValueError(f"SelfAttention: x must be [B, T, C], got shape {x.shape}")
        B, T, C = x.shape
        dtype = self.dtype or x.dtype
        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.num_heads, self.head_dim), dtype=dtype, param_dtype=self.param_dtype,
            use_bias=False, name=name,
        )  # fmt: skip
        q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # [B, T, H, D]
        q, k, v = self._q(q, "query"), self._q(k, "key"), self._q(v, "value")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        pos = start + jnp.arange(T, dtype=jnp.int32)  # [T]
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        new_cache = None
        if cache is not None:
            k, v, mask, new_cache = extend_kv_cache(
                "SelfAttention", cache, x.shape, k, v, pos, mask, chunk_causal
            )
        elif mask is not None and mask.shape != (T, T):
            raise ValueError(f"SelfAttention: mask must be [T, T] = {(T, T)}, got {mask.shape}")
        scale = self.head_dim**-0.5
        s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
        s = s * scale
        s = self._q(s, "scores")
        if mask is not None:
            s = jnp.where(mask[None, None], s, jnp.finfo(jnp.float32).min)
        p = self._q(jax.nn.softmax(s, axis=-1), "probs")
        o = jnp.einsum("bhts,bshd->bthd", p, v.astype(jnp.float32)).astype(dtype)  # [B, T, H, D]
        o = self._q(o, "attn_out")
        y = nn.DenseGeneral(C, axis=(-2, -1), dtype=dtype, param_dtype=self.param_dtype,
                            use_bias=False, name="out")(o)  # fmt: skip
        return self._q(y, "proj_out"), new_cache


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN x), then x + MLP(LN x) with GELU (GPT-2 style).

    Attributes:
      num_heads, head_dim: attention shape.
      mlp_ratio: hidden width of the MLP as a multiple of the model width.
      dtype, param_dtype: compute and storage dtypes.
      act_quant: optional ``fn(x, name) -> x`` on every intermediate (see `SelfAttention`).
    """

    num_heads: int
    head_dim: int
    mlp_ratio: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32
    act_quant: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None, cache=None, chunk_causal=False):
        """``(y, new_cache)``; arguments as `SelfAttention` (``act_quant`` also wraps the
        LayerNorm outputs, the residual sums, the MLP's hidden layer and its GELU)."""
        q = (lambda x, n: x) if self.act_quant is None else self.act_quant  # noqa: E731
        C = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, cache = SelfAttention(self.num_heads, self.head_dim, **kw, act_quant=self.act_quant,
                                 name="attn")(
            q(nn.LayerNorm(name="ln1", **kw)(x), "ln1"), mask=mask, cache=cache,
            chunk_causal=chunk_causal,
        )  # fmt: skip
        x = q(x + h, "residual1")
        h = q(nn.Dense(self.mlp_ratio * C, name="fc1", **kw)(
            q(nn.LayerNorm(name="ln2", **kw)(x), "ln2")), "fc1")  # fmt: skip
        x = x + q(nn.Dense(C, name="fc2", **kw)(q(nn.gelu(h), "gelu")), "fc2")
        return q(x, "residual2"), cache
