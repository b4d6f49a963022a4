"""Bad inputs to the vision ops and layers: one table, each row (callable, expected exception,
regex the message must match). `pointwise_conv_bn`, `ConvBN`/`LinearBN`, the norm layers,
`selective_scan`, `SS2D`/`MultiScaleSS2D`, `fft_conv`'s flags and the dispatch's implementation
argument.
What each does with non-finite values is tested below the table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.msvmamba import MultiScaleSS2D
from jaxblocks.kernels.conv_bn import pointwise_conv_bn
from jaxblocks.kernels.long_conv.api import fft_conv
from jaxblocks.kernels.selective_scan.api import selective_scan
from jaxblocks.layers import (
    SS2D,
    BatchChannelNorm,
    ConvBN,
    EvoNormB0,
    GhostBatchNorm,
    LinearBN,
    PowerNorm,
)

KEY = jax.random.key(0)
P = functools.partial
_RNG = np.random.default_rng(0)  # NumPy draws: JAX ones would compile at collection
x4 = jnp.asarray(_RNG.standard_normal((2, 4, 4, 8)), jnp.float32)
empty = jnp.zeros((0, 4, 4, 8))
w = jnp.asarray(_RNG.standard_normal((8, 6)), jnp.float32)
ones6, zeros6 = jnp.ones(6), jnp.zeros(6)
u = jnp.asarray(_RNG.standard_normal((2, 8, 5)), jnp.float32)
A = -jnp.ones((8, 4))
Bm = jnp.ones((2, 4, 5))


def _conv_bn(**kw):
    args = dict(x=x4, w=w, scale=ones6, bias=zeros6, mean=zeros6, var=ones6) | kw
    return lambda: pointwise_conv_bn(**args)


def _train_on(layer, x, **kw):
    def run():
        v = layer.init(KEY, x4, **kw)
        return layer.apply(v, x, mutable=[c for c in v if c != "params"], **kw)

    return run


CASES = [
    # --- pointwise_conv_bn ---------------------------------------------------------------------
    ("cbn_eps0", _conv_bn(epsilon=0.0), ValueError, r"epsilon must be a positive finite"),
    ("cbn_eps_nan", _conv_bn(epsilon=float("nan")), ValueError, r"epsilon must be a positive"),
    ("cbn_eps_bool", _conv_bn(epsilon=True), ValueError, r"epsilon must be a positive"),
    ("cbn_neg_var", _conv_bn(var=ones6.at[2].set(-0.5)), ValueError,
     r"var must be non-negative \(a running variance\), got -0.5 at index 2"),
    ("cbn_w_shape", _conv_bn(w=jnp.ones((7, 6))), ValueError, r"x's last dim \(C_in\) must"),
    ("cbn_scale_shape", _conv_bn(scale=jnp.ones(5)), ValueError, r"scale must have shape \(6,\)"),
    ("cbn_int_x", _conv_bn(x=jnp.ones((2, 8), jnp.int32)), TypeError, r"x must have dtype in"),
    ("cbn_act", _conv_bn(activation="tanh"), ValueError, r"activation must be one of"),
    ("cbn_impl_type", _conv_bn(implementation=1), TypeError,
     r"pointwise_conv_bn: implementation must be None or a str"),
    ("cbn_impl_list", _conv_bn(implementation=["xla"]), TypeError, r"must be None or a str"),
    # --- ConvBN / LinearBN -----------------------------------------------------------------------
    ("convbn_empty_train", _train_on(ConvBN(8, (3, 3)), empty, train=True), ValueError,
     r"ConvBN: train mode computes batch statistics, but x of shape \(0, 4, 4, 8\) holds no"),
    ("linearbn_empty_train", _train_on(LinearBN(8), empty, train=True), ValueError,
     r"LinearBN: train mode computes batch statistics"),
    ("convbn_bad_mode", lambda: ConvBN(8, (3, 3)).init(KEY, x4, "fold"), ValueError,
     r"must be one of \['train', 'eval', 'tune', 'deploy'\]"),
    ("convbn_rank", lambda: ConvBN(8, (3, 3)).init(KEY, jnp.ones((4, 4, 8)), train=True),
     ValueError, r"ConvBN"),
    # --- norm layers: empty batches ----------------------------------------------------------
    ("ghost_empty", _train_on(GhostBatchNorm(2), empty, use_running_average=False), ValueError,
     r"GhostBatchNorm: input has an empty batch"),
    ("power_empty", _train_on(PowerNorm(), empty, use_running_average=False), ValueError,
     r"PowerNorm: input has an empty batch"),
    ("bcn_empty", _train_on(BatchChannelNorm(num_groups=2), empty, use_running_average=False),
     ValueError, r"BatchChannelNorm: input has an empty batch"),
    ("evob0_empty", _train_on(EvoNormB0(), empty, use_running_average=False), ValueError,
     r"EvoNormB0: input has an empty batch"),
    # --- selective_scan ------------------------------------------------------------------------
    ("ss_softplus_str", P(selective_scan, u, u, A, Bm, Bm, delta_softplus="yes"), TypeError,
     r"selective_scan: delta_softplus must be a bool, got str 'yes'"),
    ("ss_last_int", P(selective_scan, u, u, A, Bm, Bm, return_last_state=1), TypeError,
     r"return_last_state must be a bool, got int 1"),
    ("ss_delta_shape", P(selective_scan, u, u[:, :4], A, Bm, Bm), ValueError,
     r"selective_scan: delta must have shape"),
    ("ss_impl_type", P(selective_scan, u, u, A, Bm, Bm, implementation=3), TypeError,
     r"implementation must be None or a str"),
    # --- SS2D / MS2D ---------------------------------------------------------------------------
    ("ss2d_rank", lambda: SS2D().init(KEY, jnp.ones((2, 16, 8))), ValueError,
     r"SS2D: x must be NHWC \[B, H, W, C\]"),
    ("ms2d_rank", lambda: MultiScaleSS2D().init(KEY, jnp.ones((2, 16, 8))), ValueError,
     r"MultiScaleSS2D: x must be NHWC"),
    ("ss2d_empty_w", lambda: SS2D().init(KEY, jnp.ones((2, 4, 0, 8))), ValueError,
     r"H, W, C >= 1"),
    # --- fft_conv flags ------------------------------------------------------------------------
    ("fft_causal_str", P(fft_conv, u, jnp.ones((8, 5)), causal="no"), TypeError,
     r"fft_conv: causal must be a bool, got str 'no'"),
    ("fft_causal_int", P(fft_conv, u, jnp.ones((8, 5)), causal=0), TypeError,
     r"causal must be a bool, got int 0"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_non_finite_values():
    """NaN in an input channel stays in that channel (no cross-channel poisoning); a NaN
    running variance under jit gives NaN only in its own output channel."""
    x = x4.at[0, 1, 1, 3].set(jnp.nan)
    y = pointwise_conv_bn(x, w, ones6, zeros6, zeros6, ones6)
    assert bool(jnp.isnan(y[0, 1, 1]).all()) and not bool(jnp.isnan(y[1]).any())
    var = ones6.at[4].set(-1.0)
    y = jax.jit(pointwise_conv_bn)(x4, w, ones6, zeros6, zeros6, var)  # unchecked under jit
    nan_channels = np.flatnonzero(np.isnan(np.asarray(y)).any(axis=(0, 1, 2)))
    assert nan_channels.tolist() == [4]
    layer = ConvBN(8, (1, 1))
    v = layer.init(KEY, x4, train=True)
    out, upd = layer.apply(v, x4.at[0, 0, 0, 0].set(jnp.inf), train=True, mutable=["batch_stats"])
    assert not bool(jnp.isfinite(upd["batch_stats"]["mean"]).all())  # as flax BatchNorm
