"""The 3-layer CNN and CNN-Aggr of "Learning to Predict Short-Term Volatility with Order Flow
Image Representation" (Lensky & Hao, https://arxiv.org/abs/2304.02472).

Both read an order-flow image ``[B, T, P, C]`` (`jaxblocks.data.order_flow`: buy and sell
volume, bid and ask depth on a time × price grid) through three conv + ReLU + max-pool layers
and a dense layer, and output the log of the next interval's realized volatility. CNN-Aggr
(``aggregate=True``) concatenates the interval's hand-crafted aggregated features to the CNN
features before the head; they travel in a fifth input channel (`pack_features`: the features
in its first row), so both models take one array and the trainer needs no second input.
Deviations: the paper's images are 240×240 at 0–255 and its exact widths are not published; the
widths here are small for CPU. The output is a log forecast (exp is applied by the
``volatility`` task), keeping forecasts positive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["OrderFlowCNN", "OrderFlowCNNConfig", "ORDER_FLOW_PRESETS"]

IMAGE_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class OrderFlowCNNConfig:
    """Three 3×3 conv layers of ``widths`` (ReLU, 2×2 max-pool), a dense layer of ``hidden``,
    one output; ``aggregate`` adds ``num_features`` packed features before the head."""

    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 64
    aggregate: bool = False
    num_features: int = 5

    def __post_init__(self):
        if len(self.widths) != 3 or min(*self.widths, self.hidden, self.num_features) < 1:
            raise ValueError(f"OrderFlowCNNConfig: three positive widths, hidden and "
                             f"num_features >= 1 expected, got {self}")  # fmt: skip


class OrderFlowCNN(nn.Module):
    """CNN (``aggregate=False``) or CNN-Aggr on order-flow images; returns ``[B]`` log
    volatility forecasts."""

    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 64
    aggregate: bool = False
    num_features: int = 5
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, x: Float[Array, "B T P C"]) -> Float[Array, " B"]:
        OrderFlowCNNConfig(tuple(self.widths), self.hidden, self.aggregate, self.num_features)
        need = IMAGE_CHANNELS + (1 if self.aggregate else 0)
        if x.ndim != 4 or x.shape[-1] < need:
            raise ValueError(f"OrderFlowCNN: x must be [B, T, P, >= {need}] (4 image channels"
                             f"{' + packed features' if self.aggregate else ''}), got "
                             f"{x.shape}")  # fmt: skip
        dtype = self.dtype or jnp.float32
        h = x[..., :IMAGE_CHANNELS].astype(dtype)
        for i, w in enumerate(self.widths):
            h = nn.relu(nn.Conv(w, (3, 3), padding="SAME", dtype=dtype, name=f"conv{i}")(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.hidden, dtype=dtype, name="fc")(h))
        if self.aggregate:
            feats = x[:, 0, : self.num_features, IMAGE_CHANNELS].astype(dtype)  # [B, F]
            h = jnp.concatenate([h, feats], axis=-1)
        return nn.Dense(1, dtype=dtype, name="out")(h)[:, 0]


ORDER_FLOW_PRESETS = {
    "order_flow_cnn": OrderFlowCNNConfig(),
    "order_flow_cnn_aggr": OrderFlowCNNConfig(aggregate=True),
}


def _example(config: OrderFlowCNNConfig) -> Array:
    c = IMAGE_CHANNELS + (1 if config.aggregate else 0)
    return jnp.linspace(0.0, 1.0, 2 * 16 * 16 * c, dtype=jnp.float32).reshape(2, 16, 16, c)


register_presets(
    OrderFlowCNN.from_config,
    ORDER_FLOW_PRESETS,
    example_input=_example,
    doc="{name}: the order-flow-image volatility CNN (paper 25).",
    paper=Paper(
        "Learning to Predict Short-Term Volatility with Order Flow Image Representation",
        arxiv="2304.02472",
    ),
    params_source="no published count: the paper gives no layer widths; jaxblocks demo sizes",
    tiny={"widths": (4, 8, 8), "hidden": 8},
)
