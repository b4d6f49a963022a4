"""LMUFormer blocks: convolutional patch embedding, LMU token mixing, ConvFFN; spiking variants.

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


def _lif(v_threshold: float = 1.0) -> LIF:
    # spikingjelly MultiStepLIFNode(tau=2, detach_reset=True) over the token axis, as the code
    # (its BatchNorm1d output is permuted to [N, C, B], so N, the sequence, is the LIF's time).
    return LIF(v_threshold=v_threshold)


def _check_ms(where: str, spiking: bool, membrane_shortcut: bool) -> None:
    if membrane_shortcut and not spiking:
        raise ValueError(f"{where}: membrane_shortcut=True needs spiking=True (the official "
                         "slmu_rnn_ms_conv1d is a spiking model)")  # fmt: skip


class Conv1dEmbedding(nn.Module):
    """LMUFormer's convolutional patch embedding with a convolutional relative position encoding.

    Four k=3 Conv1d (no bias, "same" padding) and a k=3 relative-position conv ``rpe``, in the
    three forms of the official code (``src/blocks/conv1d_embedding.py``):

    * non-spiking (``Tokenizer``, model ``lmu_rnn_conv1d``): ``[conv → ReLU → BN] × 4``, then
      ``x + rpe_conv(x)`` (no BN, no activation on the PE);
    * spiking (``Conv1d4EB``, ``slmu_rnn_conv1d``): ``[conv → BN → LIF] × 4``, then
      ``x + LIF(BN(rpe_conv(x)))``;
    * spiking with membrane shortcut (``Conv1d4EBMs``, ``slmu_rnn_ms_conv1d``, the official
      default): ``[conv → BN → LIF] × 3 → conv``, then ``x + rpe_conv(LIF(BN(x)))`` — the
      residual stream carries membrane potentials, spikes only feed the convolutions.

    The embedding sees one step ahead per layer (centred kernels, as the code); the LMU after it
    is causal.
    """

    features: int
    spiking: bool = False
    membrane_shortcut: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T Cin"], *, train: bool = False) -> Float[Array, "B T C"]:
        _check_ms("Conv1dEmbedding", self.spiking, self.membrane_shortcut)
        dtype = self.dtype or x.dtype
        conv = functools.partial(
            nn.Conv, self.features, (3,), padding="SAME", use_bias=False, dtype=dtype,
            param_dtype=self.param_dtype,
        )  # fmt: skip
        if not self.spiking:
            for i in range(4):
                x = _bn(train, dtype, f"proj_bn{i}")(nn.relu(conv(name=f"proj_conv{i}")(x)))
            return x + conv(name="rpe_conv")(x)
        last = 3 if self.membrane_shortcut else 4
        for i in range(last):
            x = _lif()(_bn(train, dtype, f"proj_bn{i}")(conv(name=f"proj_conv{i}")(x)))
        if self.membrane_shortcut:
            x = conv(name="proj_conv3")(x)
            return x + conv(name="rpe_conv")(_lif()(_bn(train, dtype, "proj_bn3")(x)))
        return x + _lif()(_bn(train, dtype, "rpe_bn")(conv(name="rpe_conv")(x)))


class LMUMixer(nn.Module):
    """Token mixer: the official ``LMU`` / ``SLMU`` / ``SLMUMs`` of ``src/blocks/lmu.py``.

    Non-spiking: `LMU` (hidden = memory = C) → 1×1 conv → BN. Spiking: the spiking `LMU`
    (memory 2·C) → 1×1 conv → BN → LIF. Membrane shortcut: BN → LIF (threshold 0.5, as the
    code) → spiking `LMU` → 1×1 conv → BN, no spike at the output.
    """

    theta: float
    memory_size: int | None = None
    spiking: bool = False
    membrane_shortcut: bool = False
    mode: str = "parallel"
    implementation: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T C"], *, train: bool = False, mode: str | None = None
    ) -> Float[Array, "B T C"]:
        _check_ms("LMUMixer", self.spiking, self.membrane_shortcut)
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        memory = self.memory_size or (2 * C if self.spiking else C)
        if self.membrane_shortcut:
            x = _lif(v_threshold=0.5)(_bn(train, dtype, "prev_bn")(x))
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
        return _lif()(y) if self.spiking and not self.membrane_shortcut else y


class ConvFFN(nn.Module):
    """Channel mixer, the official ``ConvFFN`` / ``ConvFFNMs`` (``src/blocks/mlp.py``).

    Non-spiking: 1×1 conv → BN → GELU → 1×1 conv → BN → ReLU (the code's ``fc1`` activation
    is GELU unless spiking, ``fc2``'s is the model's ``act_type``, ReLU). Spiking: the same
    with LIF for both. Membrane shortcut (pre-activation): BN → LIF → 1×1 conv → BN → LIF →
    1×1 conv.
    """

    hidden_features: int
    spiking: bool = False
    membrane_shortcut: bool = False
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T C"]:
        _check_ms("ConvFFN", self.spiking, self.membrane_shortcut)
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        if self.membrane_shortcut:
            x = dense(self.hidden_features, name="fc1")(_lif()(_bn(train, dtype, "fc1_bn")(x)))
            return dense(C, name="fc2")(_lif()(_bn(train, dtype, "fc2_bn")(x)))
        act1 = _lif() if self.spiking else functools.partial(nn.gelu, approximate=False)
        act2 = _lif() if self.spiking else nn.relu
        x = act1(_bn(train, dtype, "fc1_bn")(dense(self.hidden_features, name="fc1")(x)))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = act2(_bn(train, dtype, "fc2_bn")(dense(C, name="fc2")(x)))
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class LMUFormerBlock(nn.Module):
    """LMUFormer block — Liu et al. 2024, https://arxiv.org/abs/2402.04882.

    A transformer-shaped block whose token mixer is a Legendre Memory Unit instead of
    attention: ``x = x + LMUMixer(x); x = x + ConvFFN(x)``. The LMU is trained in its parallel
    form (one FFT convolution with the memory's impulse response) and can run step by step at
    inference (``mode="recurrent"``, same numbers), so the block streams like an RNN. The
    spiking variant puts BN + LIF neurons (τ 2, hard reset, sigmoid surrogate gradient) after
    every projection, with memory 2·C; ``membrane_shortcut=True`` (the official default model,
    ``slmu_rnn_ms_conv1d``) moves BN + LIF in front of each projection, so the residual stream
    carries membrane potentials and only the projections see spikes.

    Attributes:
      theta: LMU window (the code uses θ = sequence length = 128).
      mlp_ratio: ConvFFN hidden width / C. spiking: the spiking variant.
      membrane_shortcut: the membrane-shortcut spiking variant (needs ``spiking``).
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
    membrane_shortcut: bool = False
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
        kw = dict(
            spiking=self.spiking,
            membrane_shortcut=self.membrane_shortcut,
            dtype=dtype,
            param_dtype=self.param_dtype,
        )
        x = x.astype(dtype)
        x = x + LMUMixer(
            self.theta, mode=self.mode, implementation=self.implementation, name="mixer", **kw
        )(x, train=train, mode=mode)
        x = x + ConvFFN(int(self.mlp_ratio * C), dropout=self.dropout, name="ffn", **kw)(
            x, train=train
        )
        return x
