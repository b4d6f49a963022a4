"""Every registered model (its tiny variant) and the public Linen layers work from `flax.nnx`
through `flax.nnx.bridge.ToNNX`: the NNX call equals the Linen apply on the same variables, in
eval and (where the model keeps running statistics) train mode, with the statistics updated alike.

Our parameters carry logical axis names; NNX then shards variables eagerly, which needs a mesh.
Without one, build under ``nnx.use_eager_sharding(False)`` (as here), or inside
``jax.set_mesh(mesh)`` with ``nn.logical_axis_rules`` mapping the names to mesh axes.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_vars

import jaxblocks.layers as L
from jaxblocks.registry import create_model, example_input, list_models, model_info
from tests.kernels.harness import leaves_changed


def _to_nnx(module, x, **kw):
    with nnx.use_eager_sharding(False):
        m = bridge.ToNNX(module, rngs=nnx.Rngs(0))
        m.lazy_init(x, **kw)
    return m


def _linen_vars(m) -> dict:
    """The NNX module's variables as Linen collections (params, batch_stats, ...)."""
    attrs = {k: v for k, v in vars(m).items() if k != "to_nnx__rngs"}
    attrs = {k: v for k, v in attrs.items() if isinstance(v, nnx.Variable | nnx.Module | dict)}
    return nn.unbox(bridge_vars.nnx_attrs_to_linen_vars(attrs))


def _takes_train(module) -> bool:
    return "train" in inspect.signature(type(module).__call__).parameters


def _close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def _one_per_class() -> list[str]:
    """One registered model per model class (presets and norm variants share the bridge path;
    eager NNX calls are slow on CPU, so every preset would cost minutes)."""
    seen, names = set(), []
    for name in list_models():
        m = create_model(name)
        key = type(m).__name__
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


# The models whose bridge check runs in the fast suite: cheap ones (under ~8 s of eager NNX calls
# on a 2-core CPU) that cover params-only models, BatchNorm with train-mode statistics
# (resnet18, mobilenet_v2), recurrent and attention LMs, and audio/video/graph-free inputs. The
# bridge does not depend on the architecture beyond the variable collections and call
# signature (the public layers below cover the rest); every other model class runs under
# `make test-slow` (this check took ~12 min of the fast suite for all ~85 classes).
FAST = {
    "cnn_tiny", "mlp_tiny", "diffusion_unet_digits", "order_flow_cnn", "mobilenet_v2",
    "avg_pool_clips", "wave_cnn", "convfirst_net_tiny", "nbp_video_tiny", "byol_directpred",
    "bnn_small", "char_lm_tiny", "mossformer2", "lmuformer_gsc", "resnet18", "lstm_lm_tiny",
}  # fmt: skip


def test_fast_models_are_registered():
    assert FAST <= set(_one_per_class())


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in _one_per_class()],
)
def test_registered_model_through_to_nnx(name):
    tiny = model_info(name).tiny
    model, x = create_model(name, **tiny), example_input(name, **tiny)
    kw_eval = {"train": False} if _takes_train(model) else {}
    m = _to_nnx(model, x, **kw_eval)
    variables = _linen_vars(m)
    assert "params" in variables
    with nnx.use_eager_sharding(False):
        _close(m(x, **kw_eval), model.apply(variables, x, **kw_eval))
        if "batch_stats" in variables and _takes_train(model):
            out_nnx = m(x, train=True, mutable=["batch_stats"])
            out_linen, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            _close(out_nnx, out_linen)
            _close(_linen_vars(m)["batch_stats"], upd["batch_stats"])
            moved = leaves_changed(upd["batch_stats"], variables["batch_stats"])
            assert any(jax.tree.leaves(moved)), f"{name}: train mode updated nothing"


# Module-level inputs from NumPy (random draws in JAX here would compile at collection).
_RNG = np.random.default_rng(0)
X4 = jnp.asarray(_RNG.standard_normal((2, 8, 8, 16)), jnp.float32)
X3 = jnp.asarray(_RNG.standard_normal((2, 12, 16)), jnp.float32)
X2 = jnp.asarray(_RNG.standard_normal((2, 64)), jnp.float32)  # waveforms
XSPEC = jnp.asarray(_RNG.standard_normal((2, 9, 7, 2)), jnp.float32)  # [B, F, T, re/im]
X5 = jnp.asarray(_RNG.standard_normal((2, 8, 6, 4, 2)), jnp.float32)  # [B, F, T, C, re/im]
LAYERS = {  # layer -> (module, input, call kwargs)
    "ConvBN": (L.ConvBN(8, (3, 3)), X4, {"train": False}),
    "LinearBN": (L.LinearBN(8), X3, {"train": False}),
    "GhostBatchNorm": (L.GhostBatchNorm(2), X4, {"use_running_average": True}),
    "PowerNorm": (L.PowerNorm(), X4, {"use_running_average": True}),
    "BatchChannelNorm": (L.BatchChannelNorm(num_groups=4), X4, {"use_running_average": True}),
    "EvoNormB0": (L.EvoNormB0(), X4, {"use_running_average": True}),
    "EvoNormS0": (L.EvoNormS0(groups=4), X4, {}),
    "WSConv": (L.WSConv(8, (3, 3)), X4, {}),
    "RepBN": (L.RepBN(), X3, {"use_running_average": True}),
    "SqueezeExcite": (L.SqueezeExcite(reduction=4), X4, {}),
    "SimplifiedLinearAttention": (
        L.SimplifiedLinearAttention(num_heads=2),
        X3,
        {"spatial_shape": (3, 4)},
    ),
    "GatedLinearAttention": (L.GatedLinearAttention(num_heads=2), X3, {}),
    "SwiGLU": (L.SwiGLU(32), X3, {}),
    "LSTM": (L.LSTM(16, num_heads=2), X3, {}),
    "GRU": (L.GRU(16, num_heads=2), X3, {}),
    "LongConv": (L.LongConv(l_max=12), X3, {}),
    "LMU": (L.LMU(memory_size=4, theta=12.0, hidden_size=16), X3, {}),
    "SS2D": (L.SS2D(), X4, {}),
    "PixelShuffle": (L.PixelShuffle(2), X4, {}),
    "OneWayConv": (L.OneWayConv(8, 3, rank=2), X4, {}),
    "SelfAttention": (L.SelfAttention(num_heads=2, head_dim=8), X3, {}),
    "TransformerBlock": (L.TransformerBlock(num_heads=2, head_dim=8), X3, {}),
    "UniDeepFsmn": (L.UniDeepFsmn(hidden_size=16, lorder=3), X3, {}),
    "UniDeepFsmnDilated": (L.UniDeepFsmnDilated(hidden_size=16, lorder=3), X3, {}),
    "DilatedDenseFsmn": (L.DilatedDenseFsmn(depth=2, lorder=3), X3, {}),
    "PoincareLinear": (L.PoincareLinear(8), X3, {}),
    "PoincareConv2d": (L.PoincareConv2d(8, (3, 3), padding=1), X4, {}),
    "ConvSTFT": (L.ConvSTFT(win_len=16, hop_len=8, fft_len=16), X2, {}),
    "ConviSTFT": (L.ConviSTFT(win_len=16, hop_len=8, fft_len=16), XSPEC, {}),
    "ComplexConv2d": (L.ComplexConv2d(4, (3, 3), padding=(1, 1)), X5, {}),
    "ComplexConvTranspose2d": (L.ComplexConvTranspose2d(4, (3, 2), strides=(2, 1)), X5, {}),
    "ComplexBatchNorm": (L.ComplexBatchNorm(), X5, {"train": False}),
    "ComplexSE": (L.ComplexSE(reduction=2), X5, {}),
    "ComplexUniDeepFsmn": (L.ComplexUniDeepFsmn(hidden_size=8, lorder=3), X5, {}),
    "ComplexUniDeepFsmnFreq": (L.ComplexUniDeepFsmnFreq(hidden_size=8, lorder=3), X5, {}),
    "CausalUniDeepFsmn": (L.CausalUniDeepFsmn(hidden_size=8, lorder=3), X3, {}),
    "DirectPredictor": (L.DirectPredictor(), X3[:, 0], {}),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_public_layer_through_to_nnx(name):
    layer, x, kw = LAYERS[name]
    m = _to_nnx(layer, x, **kw)
    variables = _linen_vars(m)
    with nnx.use_eager_sharding(False):
        _close(m(x, **kw), layer.apply(variables, x, **kw))


def test_the_layer_table_covers_the_public_layers():
    public = {
        n for n, obj in vars(L).items() if inspect.isclass(obj) and issubclass(obj, nn.Module)
    }
    not_covered = public - set(LAYERS) - {"LayerNorm", "ElmanRNN", "SLSTM", "FlashRNN",
                                          "LayerNormGRU", "LayerNormLSTM", "LIF",
                                          "PRepBN", "ShortConvolution"}  # fmt: skip
    assert not not_covered, f"add these layers to LAYERS: {sorted(not_covered)}"
