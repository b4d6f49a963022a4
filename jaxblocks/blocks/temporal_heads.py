"""TS-LSTM and Temporal-Inception heads over per-frame CNN features.

Ma, Chen, Kira, AlRegib, "TS-LSTM and Temporal-Inception: Exploiting Spatiotemporal Dynamics
for Activity Recognition", https://arxiv.org/abs/1703.10667 (official code: Torch7,
chihyaoma/Activity-Recognition-with-CNN-and-RNN). Both heads take ``[B, T, F]`` per-frame
features (the paper's come from two-stream ResNet-101s) and return class logits; the
order-free baseline they are compared with is `TemporalAvgPoolHead`.

* `TSLSTMHead`: the video is cut into ``num_segments`` temporal segments, features are
  mean-pooled inside each segment, an LSTM runs over the segment sequence and its outputs are
  averaged over the segments before the classifier.
* `TemporalInceptionHead`: the frame features form a 1-D sequence; each layer applies parallel
  temporal convolutions of several widths (1×1 reductions before the wider ones, GoogLeNet
  style) plus a max-pool branch, concatenates them and downsamples time by 2; temporal
  max-pooling and a classifier close it.

Sizes follow the paper's description where it gives them and are attributes otherwise; the
official Lua code of these two heads is not in the repository we could read, so the exact
widths are ours (say so in a report that compares with the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.recurrent import LSTM
from jaxblocks.typing import Array, Float

__all__ = ["TSLSTMHead", "TemporalAvgPoolHead", "TemporalInceptionHead", "temporal_segments"]

Dtype = Any


def _check_frames(where: str, x) -> None:
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{where}: x must be per-frame features [B, T, F], got shape "
                         f"{getattr(x, 'shape', None)}")  # fmt: skip
    if x.shape[1] < 1:
        raise ValueError(f"{where}: x has no frames (T = 0), shape {x.shape}")


def temporal_segments(x: Float[Array, "B T F"], num_segments: int) -> Float[Array, "B S F"]:
    """Mean of ``x`` over ``num_segments`` consecutive, near-equal frame ranges.

    As `numpy.array_split`: the first ``T mod S`` segments have ``⌊T/S⌋ + 1`` frames, the
    others ``⌊T/S⌋``; needs ``1 <= num_segments <= T``.
    """
    _check_frames("temporal_segments", x)
    t = x.shape[1]
    if not 1 <= num_segments <= t:
        raise ValueError(f"temporal_segments: num_segments={num_segments} must be in [1, T={t}]")
    q, r = divmod(t, num_segments)
    bounds = [s * q + min(s, r) for s in range(num_segments + 1)]
    means = [
        x[:, a:b].astype(jnp.float32).mean(1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return jnp.stack(means, axis=1).astype(x.dtype)


class TemporalAvgPoolHead(nn.Module):
    """Order-free baseline of https://arxiv.org/abs/1703.10667: mean over frames → classifier.

    Attributes:
      num_classes: outputs.
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_classes: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T F"], *, train: bool = False) -> Float[Array, "B K"]:
        del train
        _check_frames("TemporalAvgPoolHead", x)
        h = x.astype(jnp.float32).mean(1).astype(self.dtype or x.dtype)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="classifier")(h)  # fmt: skip


class TSLSTMHead(nn.Module):
    """Temporal-segment LSTM head (TS-LSTM, https://arxiv.org/abs/1703.10667).

    Unlike an LSTM over every frame (LRCN), the LSTM sees ``num_segments`` segment means, which
    keeps the order of the video's phases while averaging out frame-level noise.

    Attributes:
      num_classes: outputs.
      num_segments: temporal segments (the paper uses 3 segments of the sampled frames).
      hidden: LSTM width.
      dropout: on the segment features before the LSTM (training only; needs a "dropout" rng).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> head = TSLSTMHead(num_classes=6, num_segments=3, hidden=16)
      >>> x = jnp.ones((2, 8, 32))
      >>> head.init_with_output(jax.random.key(0), x)[0].shape
      (2, 6)
    """

    num_classes: int
    num_segments: int = 3
    hidden: int = 64
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T F"], *, train: bool = False) -> Float[Array, "B K"]:
        _check_frames("TSLSTMHead", x)
        seg = temporal_segments(x, self.num_segments)  # [B, S, F]
        seg = nn.Dropout(self.dropout, deterministic=not train)(seg)
        h, _ = LSTM(features=self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="lstm")(seg)  # [B, S, hidden]  # fmt: skip
        h = h.astype(jnp.float32).mean(1).astype(h.dtype)  # average over the segments
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="classifier")(h)  # fmt: skip


class TemporalInceptionHead(nn.Module):
    """Temporal-Inception head (https://arxiv.org/abs/1703.10667): inception over time.

    Each of ``len(widths)`` layers runs, in parallel over the ``[B, T, F]`` sequence, a 1-wide
    convolution and, for each kernel in ``kernels`` wider than 1, a 1-wide reduction followed
    by that kernel; plus a 3-wide max-pool followed by a 1-wide projection (all "SAME", ReLU);
    the branches are concatenated (``width`` channels each) and time is max-pooled by 2 (when
    T > 1). Then max over time and the classifier.

    Attributes:
      num_classes: outputs.
      widths: channels per branch of each layer.
      kernels: temporal kernel sizes of the conv branches (1 always included).
      dropout: before the classifier (training only).
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_classes: int
    widths: Sequence[int] = (32, 32)
    kernels: Sequence[int] = (1, 3, 5)
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T F"], *, train: bool = False) -> Float[Array, "B K"]:
        _check_frames("TemporalInceptionHead", x)
        if any(int(k) < 1 for k in self.kernels) or not self.widths:
            raise ValueError(f"TemporalInceptionHead: kernels must be >= 1 and widths non-empty, "
                             f"got kernels={self.kernels}, widths={self.widths}")  # fmt: skip
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, padding="SAME")

        def conv(h, width, k, name):
            return nn.relu(nn.Conv(width, (k,), name=name, **kw)(h))

        for i, width in enumerate(self.widths):
            branches = []
            for k in sorted({1, *(int(k) for k in self.kernels)}):
                if k == 1:
                    branches.append(conv(x, width, 1, f"layer{i}_conv1"))
                else:
                    r = conv(x, width, 1, f"layer{i}_reduce{k}")
                    branches.append(conv(r, width, k, f"layer{i}_conv{k}"))
            p = nn.max_pool(x, (3,), strides=(1,), padding="SAME")
            branches.append(conv(p, width, 1, f"layer{i}_pool_proj"))
            x = jnp.concatenate(branches, axis=-1)
            if x.shape[1] > 1:
                x = nn.max_pool(x, (2,), strides=(2,), padding="VALID")
        h = jnp.max(x, axis=1)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="classifier")(h)  # fmt: skip
