"""Tiny models for trainer tests and smoke runs: an MLP, a BatchNorm CNN and a causal LM.

They are deliberately small (thousands of parameters) so sharding, checkpointing and
large-batch recipes run in seconds on CPU. All parameters carry logical axis names, so the
trainer's rules shard them over ``fsdp``/``tensor``. The calling convention is the trainer's:
``model.apply(variables, x, train=bool[, use_aux=bool])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxblocks.layers.norm import GhostBatchNorm
from jaxblocks.layers.ring_attention import (
    DEFAULT_BATCH_AXES,
    DEFAULT_HEAD_AXIS,
    DEFAULT_SEQUENCE_AXIS,
    dense_attention,
    ring_attention,
)
from jaxblocks.registry import register_model


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class MLP(nn.Module):
    """Flatten → (Dense → ReLU)* → Dense classifier. No normalization, so gradient
    accumulation is exactly a large batch."""

    hidden: Sequence[int] = (32,)
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B ..."], train: bool = False) -> Float[Array, "B N"]:
        del train
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, h in enumerate(self.hidden):
            x = nn.relu(_dense(h, ("embed", "mlp"), self.dtype, f"dense{i}")(x))
        return _dense(self.num_classes, ("mlp", "classes"), self.dtype, "head")(x)


class _Norm(nn.Module):
    """BatchNorm, or Ghost BatchNorm (`jaxblocks.layers.norm.GhostBatchNorm`, Hoffer et al. 2017)
    with ``ghost_batch_size`` examples per statistics group when that is set."""

    ghost_batch_size: int | None = None
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.ghost_batch_size is None:
            return nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        return GhostBatchNorm(
            ghost_batch_size=self.ghost_batch_size,
            use_running_average=not train,
            momentum=self.momentum,
        )(x)


class CNN(nn.Module):
    """Conv3x3 → BN → ReLU → Conv3x3/2 → BN → ReLU → global mean → Dense.

    Attributes:
      channels: conv widths.
      num_classes: outputs.
      ghost_batch_size: if set, Ghost BatchNorm with this many examples per group.
      aux_bn: also create an auxiliary BatchNorm per layer (AdvProp/ConAdv): called with
        ``use_aux=True`` the model normalises with it (adversarial inputs), else with the main BN.
      first_kernel_init: the first conv's ``kernel_init`` (default He normal), e.g. a filter
        bank of `jaxblocks.layers.filter_init` (the trainer's ``model.filter_bank``).
      dtype: compute dtype (parameters stay fp32).
    """

    channels: Sequence[int] = (8, 16)
    num_classes: int = 10
    ghost_batch_size: int | None = None
    aux_bn: bool = False
    first_kernel_init: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], train: bool = False, use_aux: bool = False
    ) -> Float[Array, "B N"]:
        if x.ndim == 3:
            x = x[..., None]
        x = x.astype(self.dtype)
        for i, c in enumerate(self.channels):
            x = nn.Conv(
                c,
                (3, 3),
                strides=1 if i == 0 else 2,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    self.first_kernel_init
                    if i == 0 and self.first_kernel_init is not None
                    else nn.initializers.he_normal(),
                    (None, None, "conv_in", "conv_out"),
                ),
                name=f"conv{i}",
            )(x)
            main = _Norm(self.ghost_batch_size, name=f"bn{i}")
            if self.aux_bn:
                aux = _Norm(self.ghost_batch_size, name=f"bn{i}_aux")
                # Both branches are traced at init so both variable sets exist.
                if self.is_initializing():
                    aux(x, train)
                x = aux(x, train) if use_aux else main(x, train)
            else:
                x = main(x, train)
            x = nn.relu(x)
        x = x.astype(jnp.float32).mean((1, 2)).astype(self.dtype)
        return _dense(self.num_classes, ("conv_out", "classes"), self.dtype, "head")(x)


class CharLM(nn.Module):
    """A one-block causal Transformer over bytes, with selectable attention implementation.

    ``attention="ring"`` runs `jaxblocks.layers.ring_attention.ring_attention` over the mesh axis
    ``sequence_axis`` (dense when that axis has size 1 or no mesh is set), with the batch split
    over ``batch_axes`` and the heads over ``head_axis``; the defaults are the trainer's mesh
    axis names (``sequence``, ``("data", "fsdp")``, ``tensor``).
    """

    vocab: int = 256
    width: int = 32
    heads: int = 2
    layers: int = 1
    attention: str = "dense"
    sequence_axis: str = DEFAULT_SEQUENCE_AXIS
    batch_axes: tuple[str, ...] = DEFAULT_BATCH_AXES
    head_axis: str | None = DEFAULT_HEAD_AXIS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Int[Array, "B T"], train: bool = False) -> Float[Array, "B T V"]:
        del train
        if self.attention not in ("dense", "ring"):
            raise ValueError(f"CharLM: attention must be 'dense' or 'ring', got {self.attention!r}")
        b, t = tokens.shape
        emb = nn.Embed(
            self.vocab,
            self.width,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embed",
        )
        pos = self.param(
            "pos",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (t, self.width),
        )
        x = (emb(tokens) + pos[None]).astype(self.dtype)
        hd = self.width // self.heads
        for i in range(self.layers):
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln{i}a")(x)
            qkv = _dense(3 * self.width, ("embed", "heads"), self.dtype, f"qkv{i}")(h)
            q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, hd), 3, axis=2)
            if self.attention == "ring":
                o = ring_attention(
                    q,
                    k,
                    v,
                    causal=True,
                    sequence_axis=self.sequence_axis,
                    batch_axes=self.batch_axes,
                    head_axis=self.head_axis,
                )
            else:
                o = dense_attention(q, k, v, causal=True)
            o = o.reshape(b, t, self.width)
            x = x + _dense(self.width, ("heads", "embed"), self.dtype, f"proj{i}")(o)
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln{i}b")(x)
            h = nn.gelu(_dense(4 * self.width, ("embed", "mlp"), self.dtype, f"up{i}")(h))
            x = x + _dense(self.width, ("mlp", "embed"), self.dtype, f"down{i}")(h)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return emb.attend(x.astype(jnp.float32))


def _example_image() -> Array:
    return jnp.linspace(0.0, 1.0, 2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)


def _example_tokens() -> Array:
    return (jnp.arange(2 * 16, dtype=jnp.int32) % 256).reshape(2, 16)


@register_model(
    "mlp_tiny",
    example_input=_example_image,
    params_source="no published count: a jaxblocks demo model for tests and smoke runs",
)
def mlp_tiny(**kwargs: Any) -> MLP:
    """A 1-hidden-layer MLP (32 units)."""
    return MLP(**kwargs)


@register_model(
    "cnn_tiny",
    example_input=_example_image,
    params_source="no published count: a jaxblocks demo model for tests and smoke runs",
)
def cnn_tiny(**kwargs: Any) -> CNN:
    """A 2-conv BatchNorm CNN (8, 16 channels)."""
    return CNN(**kwargs)


@register_model(
    "char_lm_tiny",
    example_input=_example_tokens,
    params_source="no published count: a jaxblocks demo model for tests and smoke runs",
)
def char_lm_tiny(**kwargs: Any) -> CharLM:
    """A 1-block byte-level Transformer LM (width 32, 2 heads)."""
    return CharLM(**kwargs)
