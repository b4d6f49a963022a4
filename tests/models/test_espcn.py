"""ESPCN: the paper's layers (checked with lax convolutions on the same weights) and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.espcn import ESPCN, ESPCNConfig
from jaxblocks.registry import create_model, model_info


def _conv(x, kernel, bias):
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return y + bias.reshape(1, 1, 1, -1)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_forward_equals_convs_then_periodic_shuffle(activation):
    model = ESPCN(upscale_factor=2, channels=2, features=(6, 4), activation=activation)
    x = jax.random.uniform(jax.random.key(0), (2, 7, 5, 2))
    v = model.init(jax.random.key(1), x)
    p = v["params"]
    act = jnp.tanh if activation == "tanh" else jax.nn.relu
    h = act(_conv(x, p["conv1"]["kernel"], p["conv1"]["bias"]))
    h = act(_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"]))
    h = _conv(h, p["conv3"]["kernel"], p["conv3"]["bias"])  # [2, 7, 5, 2 * 4]
    want = np.zeros((2, 14, 10, 2), np.float32)
    for i in range(2):
        for j in range(2):
            for c in range(2):
                want[:, i::2, j::2, c] = h[..., c * 4 + i * 2 + j]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-5, atol=1e-6)
    assert p["conv1"]["kernel"].shape == (5, 5, 2, 6) and p["conv3"]["kernel"].shape[:2] == (3, 3)


def test_registered_preset_and_errors():
    assert model_info("espcn").published_params == 22_729
    model = create_model("espcn")
    y = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 9, 9, 1))))
    assert y[0].shape == (1, 27, 27, 1)
    with pytest.raises(ValueError, match=r"ESPCN: x must be NHWC with 1 channel\(s\), got shape"):
        model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 3)))
    with pytest.raises(ValueError, match="kernel_sizes"):
        ESPCNConfig(features=(64,), kernel_sizes=(5, 3, 3))
    with pytest.raises(ValueError, match="activation must be 'tanh' or 'relu'"):
        ESPCNConfig(activation="gelu")
    with pytest.raises(TypeError, match="upscale_factor must be an int"):
        ESPCNConfig(upscale_factor=2.0)
