"""GPT-NeoX decoder layer (Black et al., "GPT-NeoX-20B", https://arxiv.org/abs/2204.06745), as
the Block Transformer (Ho et al., https://arxiv.org/abs/2406.02657) uses it for both of its
decoders (Pythia configs), with a functional KV cache.

What differs from the project's pre-LN block (`jaxblocks.layers.transformer.TransformerBlock`):

* parallel residual: ``y = x + Attn(LN1 x) + MLP(LN2 x)`` (``use_parallel_residual``);
* one fused ``query_key_value`` projection with bias whose ``3·C`` outputs are laid out per
  head, ``[H, 3, D]`` (head 0's q, k, v, then head 1's ...), and a ``dense`` output projection
  with bias;
* rotary embedding (half-split layout) on only the first ``int(D · rotary_pct)`` dims of each
  query and key head (Pythia: 25 %), the rest passes unrotated;
* MLP ``dense_h_to_4h`` -> exact (erf) GELU -> ``dense_4h_to_h``, both with biases;
* LayerNorm eps 1e-5; every kernel initialised N(0, 0.02), biases 0 (HF ``_init_weights``).

Parameter names follow HF ``GPTNeoXLayer`` (``input_layernorm``, ``post_attention_layernorm``,
``attention/query_key_value``, ``attention/dense``, ``mlp/dense_h_to_4h``, ``mlp/dense_4h_to_h``)
so that weights copy over with a transpose of each kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxblocks.layers.transformer import KVCache, apply_rope, extend_kv_cache

__all__ = ["GPTNeoXAttention", "GPTNeoXLayer", "GPTNeoXMLP", "apply_partial_rope", "rotary_dims"]


def rotary_dims(head_dim: int, rotary_pct: float) -> int:
    """Rotated dims per head, ``int(head_dim · rotary_pct)`` as HF ``GPTNeoXAttention`` computes
    them; must be even (the half-split rotation pairs dim ``i`` with ``i + r/2``)."""
    r = int(head_dim * rotary_pct)
    if r % 2 or r < 2 or r > head_dim:
        raise ValueError(
            f"rotary_dims: int(head_dim * rotary_pct) = int({head_dim} * {rotary_pct}) = {r} must "
            f"be an even number in [2, head_dim]"
        )
    return r


def apply_partial_rope(
    x: Float[Array, "B T H D"], positions: Int[Array, " T"], rot: int, base: float = 10000.0
) -> Float[Array, "B T H D"]:
    """Rotary embedding (GPT-NeoX half-split layout) on the first ``rot`` dims of each head;
    the frequencies are those of a ``rot``-dim head (``base ** (-2i / rot)``)."""
    if rot == x.shape[-1]:
        return apply_rope(x, positions, base)
    return jnp.concatenate([apply_rope(x[..., :rot], positions, base), x[..., rot:]], axis=-1)


def _dense(features, name, dtype, param_dtype, init_std):
    return nn.Dense(
        features, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.initializers.normal(init_std), bias_init=nn.initializers.zeros,
    )  # fmt: skip


class GPTNeoXAttention(nn.Module):
    """GPT-NeoX self-attention (https://arxiv.org/abs/2204.06745): fused, head-interleaved
    ``query_key_value`` with bias, partial rotary, ``dense`` output with bias; causal through a
    mask or a `KVCache` exactly as `jaxblocks.layers.transformer.SelfAttention`.

    Attributes:
      num_heads, head_dim: heads and their width.
      rotary_pct: fraction of each head that is rotated (Pythia 0.25).
      rotary_base: RoPE base (``rotary_emb_base``, 10000).
      init_std: kernel initialiser std (``initializer_range``, 0.02).
      dtype, param_dtype: compute and storage dtypes; the softmax runs in fp32.
    """

    num_heads: int
    head_dim: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    init_std: float = 0.02
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B T C"],
        *,
        mask: Bool[Array, "T T"] | None = None,
        cache: KVCache | None = None,
        chunk_causal: bool = False,
    ) -> tuple[Float[Array, "B T C"], KVCache | None]:
        """``(y, new_cache)``; ``mask`` (``[T, T]``, True = may attend) without a cache, or a
        cache that the chunk is appended to (``chunk_causal``: the chunk attends to itself
        causally, else fully)."""
        if x.ndim != 3:
            raise ValueError(f"GPTNeoXAttention: x must be [B, T, C], got shape {x.shape}")
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        rot = rotary_dims(D, self.rotary_pct)
        dtype = self.dtype or x.dtype
        qkv = _dense(3 * H * D, "query_key_value", dtype, self.param_dtype, self.init_std)(x)
        qkv = qkv.reshape(B, T, H, 3, D)  # HF's per-head [q, k, v] layout
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, H, D]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        pos = start + jnp.arange(T, dtype=jnp.int32)  # [T]
        q = apply_partial_rope(q, pos, rot, self.rotary_base)
        k = apply_partial_rope(k, pos, rot, self.rotary_base)
        new_cache = None
        if cache is not None:
            k, v, mask, new_cache = extend_kv_cache(
                "GPTNeoXAttention", cache, x.shape, k, v, pos, mask, chunk_causal
            )
        elif mask is not None and mask.shape != (T, T):
            raise ValueError(f"GPTNeoXAttention: mask must be [T, T] = {(T, T)}, got {mask.shape}")
        s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * D**-0.5
        if mask is not None:
            s = jnp.where(mask[None, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", p, v.astype(jnp.float32)).astype(dtype)
        o = o.reshape(B, T, H * D)
        return _dense(C, "dense", dtype, self.param_dtype, self.init_std)(o), new_cache


class GPTNeoXMLP(nn.Module):
    """GPT-NeoX MLP (https://arxiv.org/abs/2204.06745): ``dense_h_to_4h`` -> exact GELU ->
    ``dense_4h_to_h``, both with biases.

    Attributes:
      hidden: hidden width (``intermediate_size``).
      init_std: kernel initialiser std.
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden: int
    init_std: float = 0.02
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*b C"]) -> Float[Array, "*b C"]:
        h = _dense(self.hidden, "dense_h_to_4h", self.dtype, self.param_dtype, self.init_std)(x)
        h = nn.gelu(h, approximate=False)  # HF hidden_act "gelu" is the erf form
        return _dense(x.shape[-1], "dense_4h_to_h", self.dtype, self.param_dtype,
                      self.init_std)(h)  # fmt: skip


class GPTNeoXLayer(nn.Module):
    """GPT-NeoX decoder layer (https://arxiv.org/abs/2204.06745), the layer of both Block
    Transformer decoders: ``y = x + Attn(LN1 x) + MLP(LN2 x)`` (parallel residual).

    Attributes:
      num_heads, head_dim: attention shape.
      mlp_ratio: MLP hidden width as a multiple of the model width (``intermediate_size``).
      rotary_pct, rotary_base, init_std: see `GPTNeoXAttention`.
      eps: LayerNorm epsilon (``layer_norm_eps``, 1e-5).
      dtype, param_dtype: compute and storage dtypes.

    Example::

        layer = GPTNeoXLayer(num_heads=2, head_dim=16)
        x = jax.random.normal(jax.random.key(0), (2, 5, 32))
        mask = jnp.tril(jnp.ones((5, 5), bool))
        variables = layer.init(jax.random.key(1), x, mask=mask)
        y, _ = layer.apply(variables, x, mask=mask)  # [2, 5, 32]
    """

    num_heads: int
    head_dim: int
    mlp_ratio: int = 4
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    init_std: float = 0.02
    eps: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, mask=None, cache=None, chunk_causal=False):
        """``(y, new_cache)``; arguments as `GPTNeoXAttention`."""
        C = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a, cache = GPTNeoXAttention(
            self.num_heads, self.head_dim, self.rotary_pct, self.rotary_base, self.init_std,
            **kw, name="attention",
        )(nn.LayerNorm(self.eps, name="input_layernorm", **kw)(x), mask=mask, cache=cache,
          chunk_causal=chunk_causal)  # fmt: skip
        h = nn.LayerNorm(self.eps, name="post_attention_layernorm", **kw)(x)
        m = GPTNeoXMLP(self.mlp_ratio * C, self.init_std, **kw, name="mlp")(h)
        return x + a + m, cache
