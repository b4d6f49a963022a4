"""Video classifiers: any registered image CNN per frame, then a temporal head.

Ma, Chen, Kira, AlRegib, "TS-LSTM and Temporal-Inception: Exploiting Spatiotemporal Dynamics
for Activity Recognition", https://arxiv.org/abs/1703.10667. The paper runs two-stream
ResNet-101s per frame and compares heads over the frame features; here the frame network is
any registered classifier (its ``num_classes`` output is the frame feature) and the head is
`TSLSTMHead`, `TemporalInceptionHead` or the order-free `TemporalAvgPoolHead`.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.temporal_heads import (
    TemporalAvgPoolHead,
    TemporalInceptionHead,
    TSLSTMHead,
)
from jaxblocks.registry import Paper, create_model, register_model
from jaxblocks.typing import Array, Float

__all__ = ["FrameFeatureClassifier", "HEADS"]

HEADS = {
    "ts_lstm": TSLSTMHead,
    "temporal_inception": TemporalInceptionHead,
    "avg_pool": TemporalAvgPoolHead,
}


class FrameFeatureClassifier(nn.Module):
    """Per-frame CNN features + a temporal head (https://arxiv.org/abs/1703.10667).

    ``x [B, T, H, W, C]`` → the registered ``backbone`` on every frame (``B·T`` images, its
    ``num_classes = features`` outputs as the frame feature) → ``[B, T, features]`` → ``head``
    → logits ``[B, num_classes]``. BatchNorm statistics of the backbone are over all frames of
    the batch.

    Attributes:
      num_classes: outputs.
      backbone: registry name of the frame network (e.g. ``"cnn_tiny"``, ``"resnet18"``).
      backbone_kwargs: its overrides (besides ``num_classes``).
      features: frame feature size (the backbone's ``num_classes``).
      head: ``"ts_lstm"``, ``"temporal_inception"`` or ``"avg_pool"`` (`HEADS`).
      head_kwargs: the head's attributes (``num_segments``, ``hidden``, ``widths`` ...).
      dtype: compute dtype, passed to the head.
    """

    num_classes: int = 6
    backbone: str = "cnn_tiny"
    backbone_kwargs: Any = None
    features: int = 32
    head: str = "ts_lstm"
    head_kwargs: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B T H W C"], *, train: bool = False) -> Float[Array, "B K"]:
        if getattr(x, "ndim", None) != 5:
            raise ValueError(f"FrameFeatureClassifier: x must be [B, T, H, W, C] clips, got "
                             f"shape {getattr(x, 'shape', None)}")  # fmt: skip
        if self.head not in HEADS:
            raise ValueError(f"FrameFeatureClassifier: head={self.head!r}; expected one of "
                             f"{sorted(HEADS)}")  # fmt: skip
        b, t = x.shape[:2]
        if t < 1:
            raise ValueError(f"FrameFeatureClassifier: x has no frames, shape {x.shape}")
        kw = dict(self.backbone_kwargs or {})
        net = create_model(self.backbone, num_classes=self.features, **kw)
        frames = x.reshape((b * t, *x.shape[2:]))
        call_kw = (
            {"train": train} if "train" in inspect.signature(type(net).__call__).parameters else {}
        )
        f = net.clone(parent=self, name="backbone")(frames, **call_kw)  # [B·T, features]
        f = f.reshape((b, t, -1))
        head = HEADS[self.head](
            num_classes=self.num_classes,
            dtype=self.dtype,
            name="head",
            **dict(self.head_kwargs or {}),
        )
        return head(f.astype(self.dtype or jnp.float32), train=train)


def _example_clip(**kwargs: Any) -> Array:
    del kwargs
    return jnp.linspace(-1.0, 1.0, 2 * 6 * 12 * 12, dtype=jnp.float32).reshape(2, 6, 12, 12, 1)


_PAPER = Paper(
    "TS-LSTM and Temporal-Inception: Exploiting Spatiotemporal Dynamics for Activity Recognition",
    arxiv="1703.10667",
    code="https://github.com/chihyaoma/Activity-Recognition-with-CNN-and-RNN",
)
_SOURCE = (
    "no published count: a small demo model (cnn_tiny frames, 32 features) for the synthetic "
    "action clips; the paper's heads sit on two-stream ResNet-101 features"
)


def _register(name: str, head: str, doc: str) -> None:
    def build(**kwargs: Any) -> FrameFeatureClassifier:
        return FrameFeatureClassifier(**{"head": head, **kwargs})

    build.__doc__ = doc
    register_model(name, example_input=_example_clip, paper=_PAPER, params_source=_SOURCE)(build)


_register("ts_lstm_clips", "ts_lstm", "cnn_tiny per frame + `TSLSTMHead` (3 segments).")
_register(
    "temporal_inception_clips",
    "temporal_inception",
    "cnn_tiny per frame + `TemporalInceptionHead` (kernels 1/3/5, two layers).",
)
_register("avg_pool_clips", "avg_pool", "cnn_tiny per frame + mean over frames (the baseline).")
