"""FRCRN's complex U-Net (CRED) — Zhao et al., "FRCRN: Boosting Feature Representation using
Frequency Recurrence for Monaural Speech Enhancement", ICASSP 2022,
https://arxiv.org/abs/2206.07293 (official code: modelscope/ClearerVoice-Studio
``clearvoice/models/frcrn_se/unet.py``, ``UNet(complex=True, model_depth=14)``).

The U-Net maps a complex feature map ``[B, F, T, C, 2]`` to one ``[B, F, T, 1, 2]``:

- ``num_levels`` encoders (official 7): each (but the first, whose input has one channel) is
  preceded by a frequency-recurrent complex FSMN (`ComplexUniDeepFsmnFreq`), then complex
  conv (kernel ``(5, 2)``, the last ``(2, 2)``; stride ``(2, 1)``; padding ``(0, 1)``, so every
  level halves the frequencies and adds one frame) → complex BN → LeakyReLU(0.01). A complex SE
  (`ComplexSE`) of each encoder output feeds the skip connection only; the next encoder sees
  the output without SE, as the official.
- a bottleneck complex FSMN along time (`ComplexUniDeepFsmn`, two layers);
- ``num_levels`` decoders: complex transposed conv (kernel ``(k_f, 2)``, stride ``(2, 1)``,
  padding ``(0, 1)``) → complex BN → LeakyReLU; all but the last are followed by a frequency
  FSMN, all but the last two by an SE, and all but the last by concatenation (decoder output
  first) with the matching encoder's SE'd output; the last decoder has one output channel.
- a complex 1×1 conv ``1 → 1`` (official ``linear``).

The official layout hard-codes the decoder frequency kernels ``(2, 5, 5, 5, 6, 5, 5)`` for 321
bins; here they are derived from the encoder sizes, ``k = F_skip − 2·(F_in − 1)``, which gives
the official kernels at 321 bins and lets other STFT sizes work. The official ``UNet`` also
defines four modules it never calls (``fsmn_enc0``, the last decoder FSMN, the last encoder SE
and the last decoder SE); ``official_unused=True`` creates their parameters at init (never
used) so the parameter tree and count match the released checkpoints.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.complex_nn import (
    ComplexBatchNorm,
    ComplexConv2d,
    ComplexConvTranspose2d,
    ComplexSE,
    ComplexUniDeepFsmn,
    ComplexUniDeepFsmnFreq,
)
from jaxblocks.typing import Array, Float

__all__ = ["FRCRNUNet", "unet_frequency_sizes"]


def unet_frequency_sizes(
    freq_bins: int, num_levels: int, kernel_freq: int = 5, last_kernel_freq: int = 2
) -> tuple[list[int], list[int], list[int]]:
    """``(encoder sizes [F_0 .. F_L], encoder freq kernels [L], decoder freq kernels [L])`` of
    the U-Net on ``freq_bins`` bins (stride 2, no frequency padding); decoder ``i`` maps
    ``F_{L−i}`` back to ``F_{L−1−i}`` with kernel ``F_{L−1−i} − 2·(F_{L−i} − 1)``."""
    if num_levels < 1:
        raise ValueError(f"FRCRNUNet: num_levels must be >= 1, got {num_levels}")
    ks = [kernel_freq] * (num_levels - 1) + [last_kernel_freq]
    sizes = [freq_bins]
    for k in ks:
        if sizes[-1] < k:
            raise ValueError(
                f"FRCRNUNet: {freq_bins} frequency bins are too few for {num_levels} levels "
                f"(level {len(sizes) - 1} has {sizes[-1]} bins < kernel {k}); use a larger "
                "fft_len or fewer levels"
            )
        sizes.append((sizes[-1] - k) // 2 + 1)
    dec = [sizes[num_levels - 1 - i] - 2 * (sizes[num_levels - i] - 1) for i in range(num_levels)]
    return sizes, ks, dec


class FRCRNUNet(nn.Module):
    """FRCRN complex U-Net (https://arxiv.org/abs/2206.07293): frequency-recurrent complex
    encoder–decoder with skip connections (see the module docstring for the layout).

    Attributes:
      channels: width of every encoder/decoder (official 128 at ``model_depth=14``).
      num_levels: encoder/decoder pairs (official ``model_depth // 2 = 7``).
      kernel_freq, last_kernel_freq, kernel_time: encoder kernels (official 5, 2, 2).
      fsmn_hidden: hidden width of every FSMN (official 128).
      lorder: FSMN memory taps (official 20).
      se_reduction: SE squeeze ratio (official 8).
      negative_slope: LeakyReLU slope (torch default 0.01).
      official_unused: create the official modules that are never called (see above).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> unet = FRCRNUNet(channels=8, num_levels=3, fsmn_hidden=8, lorder=3, se_reduction=4)
      >>> x = jnp.ones((1, 33, 6, 1, 2))
      >>> unet.apply(unet.init(jax.random.key(0), x), x).shape
      (1, 33, 6, 1, 2)
    """

    channels: int = 128
    num_levels: int = 7
    kernel_freq: int = 5
    last_kernel_freq: int = 2
    kernel_time: int = 2
    fsmn_hidden: int = 128
    lorder: int = 20
    se_reduction: int = 8
    negative_slope: float = 0.01
    official_unused: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B F T C 2"], train: bool = False
    ) -> Float[Array, "B F T 1 2"]:
        if x.ndim != 5 or x.shape[-1] != 2:
            raise ValueError(f"FRCRNUNet: x must be a complex feature map [B, F, T, C, 2], got "
                             f"shape {x.shape}")  # fmt: skip
        levels, c = self.num_levels, self.channels
        _, enc_k, dec_k = unet_frequency_sizes(
            x.shape[1], levels, self.kernel_freq, self.last_kernel_freq
        )
        dtype = self.dtype or x.dtype
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        fsmn = dict(hidden_size=self.fsmn_hidden, lorder=self.lorder, **kw)
        kt, pt = self.kernel_time, self.kernel_time // 2

        def act(v):
            return nn.leaky_relu(v, self.negative_slope)

        x = x.astype(dtype)
        skips = [x]  # official xs_se: the input, then each encoder's SE'd output
        for i in range(levels):
            if i > 0:
                x = ComplexUniDeepFsmnFreq(name=f"fsmn_enc{i}", **fsmn)(x)
            x = ComplexConv2d(c, (enc_k[i], kt), (2, 1), (0, pt), name=f"encoder{i}_conv", **kw)(x)
            x = act(ComplexBatchNorm(param_dtype=self.param_dtype, name=f"encoder{i}_bn")(x, train))
            if i < levels - 1:  # the last encoder's SE output is never used
                skips.append(ComplexSE(self.se_reduction, name=f"se_layer_enc{i}", **kw)(x))

        p = ComplexUniDeepFsmn(name="fsmn", **fsmn)(x)
        for i in range(levels):
            out = c if i < levels - 1 else 1
            p = ComplexConvTranspose2d(out, (dec_k[i], kt), (2, 1), (0, pt),
                                       name=f"decoder{i}_transconv", **kw)(p)  # fmt: skip
            p = act(ComplexBatchNorm(param_dtype=self.param_dtype, name=f"decoder{i}_bn")(p, train))
            if i == levels - 1:
                break
            p = ComplexUniDeepFsmnFreq(name=f"fsmn_dec{i}", **fsmn)(p)
            if i < levels - 2:
                p = ComplexSE(self.se_reduction, name=f"se_layer_dec{i}", **kw)(p)
            p = jnp.concatenate([p, skips[levels - 1 - i]], axis=-2)
        out = ComplexConv2d(1, (1, 1), name="linear", **kw)(p)

        if self.official_unused and self.is_initializing():
            # Parameters of the official modules that are defined but never called.
            dummy = jnp.zeros((1, 1, 1, c, 2), dtype)
            ComplexUniDeepFsmnFreq(name="fsmn_enc0", **fsmn)(dummy)
            ComplexUniDeepFsmnFreq(name=f"fsmn_dec{levels - 1}", **fsmn)(dummy)
            ComplexSE(self.se_reduction, name=f"se_layer_enc{levels - 1}", **kw)(dummy)
            if levels >= 2:
                ComplexSE(self.se_reduction, name=f"se_layer_dec{levels - 2}", **kw)(dummy)
        return out
