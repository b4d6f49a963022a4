"""LMUFormer blocks: convolutional patch embedding, LMU token mixing, ConvFFN; spiking variant.

Liu, Datta, Beerel, "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory
Units", ICLR 2024, https://arxiv.org/abs/2402.04882 (code zeyuliu1037/LMUFormer,
``src/blocks/{lmu,mlp,conv1d_embedding}.py``). Layout here is channels last, ``[B, T, C]``
(the code's Conv1d ``[B, C, N]``; a kernel-1 Conv1d is a Dense, BatchNorm1d a BatchNorm over C).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.lmu import LIF, LMU
from jaxblocks.typing import Array, Float

__all__ = ["ConvFFN", "Conv1dEmbedding", "LMUFormerBlock", "LMUMixer"]

Dtype = Any


def _bn(train: bool, dtype, name: str):
    # torch BatchNorm1d defaults: momentum 0.1 (= Flax decay 0.9), eps 1e-5.
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


def _act(spiking: bool, v_threshold: float = 1.0):
    return (
        LIF(v_threshold=v_threshold) if spiking else functools.partial(nn.gelu, approximate=False)
    )


class Conv1dEmbedding(nn.Module):
    """LMUFormer's patch embedding: four k=3 Conv1d + BN + act, plus a conv relative PE.

    ``x → [conv → BN → act] × 4 → x + act(BN(conv_rpe(x)))`` (the code's ``Conv1d4EB``; the act is
    GELU, or LIF in the spiking model). Convolutions are "same" padded, as in the code (the
    embedding sees one step ahead; the LMU after it is causal).
    """

    features: int
    spiking: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T Cin"], *, train: bool = False) -> Float[Array, "B T C"]:
        dtype = self.dtype or x.dtype
        conv = functools.partial(
            nn.Conv, self.features, (3,), padding="SAME", use_bias=False, dtype=dtype,
            param_dtype=self.param_dtype,
        )  # fmt: skip
        for i in range(4):
            x = _act(self.spiking)(_bn(train, dtype, f"proj_bn{i}")(conv(name=f"proj_conv{i}")(x)))
        rpe = _act(self.spiking)(_bn(train, dtype, "rpe_bn")(conv(name="rpe_conv")(x)))
        return x + rpe


class LMUMixer(nn.Module):
    """Token mixer: `LMU` (hidden = C, memory = C, or 2·C spiking) → 1×1 conv → BN (→ LIF)."""

    theta: float
    memory_size: int | None = None
    spiking: bool = False
    mode: str = "parallel"
    implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T C"], *, train: bool = False, mode: str | None = None
    ) -> Float[Array, "B T C"]:
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        memory = self.memory_size or (2 * C if self.spiking else C)
        h = LMU(
            hidden_size=C,
            memory_size=memory,
            theta=self.theta,
            spiking=self.spiking,
            mode=self.mode,
            implementation=self.implementation,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="lmu",
        )(x, train=train, mode=mode)
        y = nn.Dense(C, dtype=dtype, param_dtype=self.param_dtype, name="proj_conv")(h)
        y = _bn(train, dtype, "proj_bn")(y)
        return LIF()(y) if self.spiking else y


class ConvFFN(nn.Module):
    """Channel mixer: 1×1 conv → BN → act → 1×1 conv → BN → act (GELU, or LIF when spiking)."""

    hidden_features: int
    spiking: bool = False
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T C"]:
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        x = _act(self.spiking)(
            _bn(train, dtype, "fc1_bn")(dense(self.hidden_features, name="fc1")(x))
        )
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = _act(self.spiking)(_bn(train, dtype, "fc2_bn")(dense(C, name="fc2")(x)))
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class LMUFormerBlock(nn.Module):
    """LMUFormer block — Liu et al. 2024, https://arxiv.org/abs/2402.04882.

    A transformer-shaped block whose token mixer is a Legendre Memory Unit instead of
    attention: ``x = x + LMUMixer(x); x = x + ConvFFN(x)``. The LMU is trained in its parallel
    form (one FFT convolution with the memory's impulse response) and can run step by step at
    inference (``mode="recurrent"``, same numbers), so the block streams like an RNN. The
    spiking variant puts BN + LIF neurons (τ 2, hard reset, sigmoid surrogate gradient) after
    every projection, with memory 2·C.

    Attributes:
      theta: LMU window (the code uses θ = sequence length = 128).
      mlp_ratio: ConvFFN hidden width / C. spiking: the spiking variant.
      mode: LMU mode, "parallel" or "recurrent".

    Example:
      >>> blk = LMUFormerBlock(theta=16.0)
      >>> x = jnp.ones((2, 16, 8)); v = blk.init(jax.random.key(0), x)
      >>> blk.apply(v, x).shape
      (2, 16, 8)
    """

    theta: float
    mlp_ratio: float = 4.0
    spiking: bool = False
    mode: str = "parallel"
    dropout: float = 0.0
    implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T C"], *, train: bool = False, mode: str | None = None
    ) -> Float[Array, "B T C"]:
        if x.ndim != 3:
            raise ValueError(f"LMUFormerBlock: x must be [B, T, C], got shape {x.shape}")
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        kw = dict(spiking=self.spiking, dtype=dtype, param_dtype=self.param_dtype)
        x = x.astype(dtype)
        x = x + LMUMixer(
            self.theta, mode=self.mode, implementation=self.implementation, name="mixer", **kw
        )(x, train=train, mode=mode)
        x = x + ConvFFN(int(self.mlp_ratio * C), dropout=self.dropout, name="ffn", **kw)(
            x, train=train
        )
        return x
