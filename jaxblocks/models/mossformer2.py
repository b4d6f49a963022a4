"""MossFormer2 — Zhao et al., "MossFormer2: Combining Transformer and RNN-Free Recurrent Network
for Enhanced Time-Domain Monaural Speech Separation", ICASSP 2024,
https://arxiv.org/abs/2312.11825 (official code: alibabasglab/MossFormer2,
``MossFormer2_standalone/model``).

A time-domain masking separator: a learned Conv1d + ReLU encoder (stride kernel/2), a mask net
(global layer norm → 1×1 conv → scaled sinusoidal position embedding → a stack of
`MossFormer2Block`s → LayerNorm → global layer norm + skip → PReLU → 1×1 conv to one mask branch
per speaker → tanh ⊙ sigmoid gated output → 1×1 conv → ReLU), and a transposed-conv decoder
applied to each masked encoding. As the official model, the blocks see the whole sequence (the
dual-path chunking of its SepFormer ancestry is unused; attention is local in groups of
``group_size`` frames plus global linear attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxblocks.blocks.mossformer2 import MossFormer2Block
from jaxblocks.layers.fsmn import ChannelPReLU
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["MOSSFORMER2_PRESETS", "MossFormer2", "MossFormer2Config", "overlap_add_decode"]


@dataclasses.dataclass(frozen=True)
class MossFormer2Config:
    """Architecture of a `MossFormer2`; the default is the official 2-speaker model
    (``mossformer2_librimix_2spk`` / WSJ0-2mix, 8 kHz).

    Attributes:
      num_speakers: separated sources (2).
      kernel_size: encoder/decoder filter length in samples (16; stride kernel_size // 2).
      channels: encoder filters N = the blocks' width (512).
      num_layers: MossFormer2 blocks (24).
      group_size: frames per quadratic-attention group (256).
      query_key_dim: shared query/key width (128).
      expansion_factor: attention hidden width / N (4).
      rotary_dim: rotary features (min(32, query_key_dim) officially).
      inner_channels: gated FSMN block width (256).
      lorder: FSMN filters have 2·lorder − 1 taps (20).
      conv_kernel_size: FFConvM depthwise taps (17).
      dropout_rate: official 0.1 (active only with ``train=True``).
    """

    num_speakers: int = 2
    kernel_size: int = 16
    channels: int = 512
    num_layers: int = 24
    group_size: int = 256
    query_key_dim: int = 128
    expansion_factor: float = 4.0
    rotary_dim: int = 32
    inner_channels: int = 256
    lorder: int = 20
    conv_kernel_size: int = 17
    dropout_rate: float = 0.1

    def __post_init__(self):
        for f in ("num_speakers", "channels", "num_layers", "group_size", "query_key_dim",
                  "inner_channels", "lorder"):  # fmt: skip
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MossFormer2Config.{f} must be an int >= 1, got {v!r}")
        if self.kernel_size < 2 or self.kernel_size % 2:
            raise ValueError(f"MossFormer2Config.kernel_size must be even and >= 2, got "
                             f"{self.kernel_size}")  # fmt: skip
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.query_key_dim:
            raise ValueError(f"MossFormer2Config.rotary_dim must be even and <= query_key_dim, "
                             f"got {self.rotary_dim}")  # fmt: skip


def overlap_add_decode(
    h: Float[Array, "B L C"], kernel: Float[Array, "C K"], stride: int
) -> Float[Array, "B M"]:
    """torch ``ConvTranspose1d(C, 1, K, stride, bias=False)``: ``y[t·stride + j] += Σ_c h[t, c]
    kernel[c, j]``, length ``(L − 1)·stride + K``."""
    b, n, _ = h.shape
    k = kernel.shape[1]
    frames = jnp.einsum("blc,ck->blk", h, kernel.astype(h.dtype))  # [B, L, K]
    idx = (np.arange(n)[:, None] * stride + np.arange(k)[None, :]).reshape(-1)
    out = jnp.zeros((b, (n - 1) * stride + k), h.dtype)
    return out.at[:, idx].add(frames.reshape(b, -1))


def _global_layer_norm(x: Array, name: str, param_dtype: Any, parent_eps: float = 1e-8):
    # torch GroupNorm(1, C, eps=1e-8) on [B, C, T]: statistics over (T, C), per-channel affine.
    return nn.GroupNorm(num_groups=1, epsilon=parent_eps, use_fast_variance=False,
                        dtype=jnp.float32, param_dtype=param_dtype, name=name)(
        x.astype(jnp.float32)
    ).astype(x.dtype)  # fmt: skip


class MossFormer2(nn.Module):
    """MossFormer2 speech separator (https://arxiv.org/abs/2312.11825): mixture ``[B, T]`` →
    separated sources ``[B, T, num_speakers]``.

    Encoder Conv1d(1 → N, K, stride K/2, no bias) + ReLU; mask net as in the official
    ``Dual_Path_Model`` with one ``Dual_Computation_Block`` around the MossFormer2 stack;
    decoder ConvTranspose1d(N → 1, K, stride K/2, no bias); the output is cropped or zero-padded
    to T as the official wrapper. Parameters use Flax's initialisers, not torch's (the
    official code keeps torch defaults; only OffsetScale's γ ~ N(0, 0.02²) is copied).

    Attributes:
      num_speakers ... dropout_rate: see `MossFormer2Config`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> model = MossFormer2(channels=16, num_layers=1, group_size=8, query_key_dim=8,
      ...                     rotary_dim=8, inner_channels=8, lorder=3)
      >>> mix = jnp.linspace(-1.0, 1.0, 256)[None]
      >>> model.apply(model.init(jax.random.key(0), mix), mix).shape
      (1, 256, 2)
    """

    num_speakers: int = 2
    kernel_size: int = 16
    channels: int = 512
    num_layers: int = 24
    group_size: int = 256
    query_key_dim: int = 128
    expansion_factor: float = 4.0
    rotary_dim: int = 32
    inner_channels: int = 256
    lorder: int = 20
    conv_kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, mix: Float[Array, "B T"], train: bool = False) -> Float[Array, "B T S"]:
        cfg = MossFormer2Config(**{f.name: getattr(self, f.name)
                                   for f in dataclasses.fields(MossFormer2Config)})  # fmt: skip
        if mix.ndim != 2:
            raise ValueError(f"MossFormer2: mix must be [B, T] waveforms, got shape {mix.shape}")
        if mix.shape[1] < cfg.kernel_size:
            raise ValueError(f"MossFormer2: mix must have at least kernel_size = "
                             f"{cfg.kernel_size} samples, got {mix.shape[1]}")  # fmt: skip
        dtype = self.dtype
        if dtype is None:
            dtype = mix.dtype if jnp.issubdtype(mix.dtype, jnp.floating) else jnp.float32
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        n, s, k = cfg.channels, cfg.num_speakers, cfg.kernel_size
        x = mix.astype(dtype)[..., None]
        # Encoder: [B, T, 1] -> [B, L, N].
        w = nn.relu(nn.Conv(n, (k,), strides=(k // 2,), padding="VALID", use_bias=False,
                            name="encoder", **kw)(x))  # fmt: skip

        # Mask net (official Dual_Path_Model).
        h = _global_layer_norm(w, "norm", self.param_dtype)
        h = nn.Dense(n, use_bias=False, name="conv1d_encoder", **kw)(h)
        h = h + self._sinusoidal(h)
        skip = h
        for i in range(cfg.num_layers):
            h = MossFormer2Block(
                cfg.group_size, cfg.query_key_dim, cfg.expansion_factor, cfg.rotary_dim, True,
                cfg.inner_channels, cfg.lorder, cfg.conv_kernel_size, cfg.dropout_rate,
                name=f"block{i}", **kw,
            )(h, not train)  # fmt: skip
        h = nn.LayerNorm(1e-6, name="intra_final_norm", **kw)(h)
        h = _global_layer_norm(h, "intra_norm", self.param_dtype) + skip
        h = ChannelPReLU(per_channel=False, param_dtype=self.param_dtype, name="prelu")(h)
        h = nn.Dense(n * s, name="conv1d_out", **kw)(h)  # [B, L, S·N]
        b, length = h.shape[:2]
        h = h.reshape(b, length, s, n)  # torch view(B·S, N, L): speaker-major channels
        h = jnp.tanh(nn.Dense(n, name="output", **kw)(h)) * nn.sigmoid(
            nn.Dense(n, name="output_gate", **kw)(h)
        )
        mask = nn.relu(nn.Dense(n, use_bias=False, name="conv1_decoder", **kw)(h))  # [B,L,S,N]

        # Decoder: each masked encoding -> waveform.
        sep = mask * w[:, :, None, :]
        dec = self.param("decoder", nn.initializers.lecun_normal(in_axis=1, out_axis=()),
                         (n, k), self.param_dtype)  # fmt: skip
        sep = jnp.moveaxis(sep, 2, 1).reshape(b * s, length, n)
        y = overlap_add_decode(sep, dec, k // 2).reshape(b, s, -1)
        t = mix.shape[1]
        y = jnp.pad(y, ((0, 0), (0, 0), (0, max(t - y.shape[-1], 0))))[..., :t]
        return jnp.moveaxis(y, 1, 2)

    def _sinusoidal(self, h: Array) -> Array:
        # Official ScaledSinuEmbedding: [sin(t·f), cos(t·f)] · a learned scalar (init 1).
        scale = self.param("pos_enc_scale", nn.initializers.ones, (1,), self.param_dtype)
        n = h.shape[-1]
        inv = 1.0 / (10000.0 ** (np.arange(0, n, 2, dtype=np.float32) / n))
        ang = np.arange(h.shape[1], dtype=np.float32)[:, None] * inv[None, :]
        emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=-1)
        return jnp.asarray(emb[None], h.dtype) * scale[0].astype(h.dtype)


MOSSFORMER2_PRESETS: dict[str, MossFormer2Config] = {
    "mossformer2": MossFormer2Config(),
    "mossformer2_tiny": MossFormer2Config(
        channels=64, num_layers=2, group_size=64, query_key_dim=32, inner_channels=64, lorder=10
    ),
}


def _example_mix(config: MossFormer2Config) -> Array:
    t = np.arange(256, dtype=np.float32)
    return jnp.asarray((np.sin(0.07 * t) + 0.5 * np.sin(0.31 * t + 1.0))[None])


register_presets(
    MossFormer2.from_config,
    MOSSFORMER2_PRESETS,
    example_input=_example_mix,
    doc="{name}: MossFormer2 2-speaker separator preset; kwargs override config fields.",
    paper=Paper(
        "MossFormer2: Combining Transformer and RNN-Free Recurrent Network for Enhanced "
        "Time-Domain Monaural Speech Separation",
        arxiv="2312.11825",
        code="https://github.com/alibabasglab/MossFormer2",
    ),
    published_params={"mossformer2": 55_700_000},
    params_source="the paper's 55.7M; the official MossFormer2_standalone modules at its "
    "configs (N = 512, 24 layers) add up to 55,735,410 (counted from their definitions), of "
    "which 16 are the frozen rotary frequencies kept here as constants (55,735,394). "
    "mossformer2_tiny: no published count; it is this project's CPU demo size",
    params_rtol=0.005,
    tiny={
        "channels": 16,
        "num_layers": 1,
        "group_size": 16,
        "query_key_dim": 8,
        "rotary_dim": 8,
        "inner_channels": 16,
        "lorder": 4,
    },  # fmt: skip
)
