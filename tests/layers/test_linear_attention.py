"""GatedLinearAttention, the short causal conv and SwiGLU: wiring, decoding, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.gla import GLABlock
from jaxblocks.kernels.gla.reference import gla_reference
from jaxblocks.layers.linear_attention import (
    GatedLinearAttention,
    ShortConvolution,
    causal_depthwise_conv1d,
)
from jaxblocks.layers.mlp import SwiGLU, swiglu_hidden_size
from tests.kernels.harness import assert_close


def _x(B=2, T=21, D=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_layer_matches_the_papers_equations():
    """Recompute the layer by hand from its parameters with the token-loop reference."""
    B, T, D, H = 2, 21, 32, 2
    x = _x(B, T, D)
    layer = GatedLinearAttention(num_heads=H)
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    # Non-trivial norm scale, so the test sees the norm's parameter.
    params["g_norm"]["scale"] = 1 + 0.1 * jax.random.normal(jax.random.key(2), (16,))
    y = layer.apply({"params": params}, x)

    def lin(name, z):
        bias = params[name].get("bias", jnp.zeros(params[name]["kernel"].shape[-1]))
        return z @ params[name]["kernel"] + bias[None, None, :]

    q, k, v = lin("q_proj", x), lin("k_proj", x), lin("v_proj", x)
    g = jax.nn.log_sigmoid(lin("gk_proj_1", lin("gk_proj_0", x))) / 16.0
    heads = lambda t: t.reshape(B, T, H, -1)
    o, _ = gla_reference(heads(q), heads(k), heads(v), heads(g), scale=8**-0.5)
    o = (
        o
        * jax.lax.rsqrt(jnp.mean(o**2, axis=-1, keepdims=True) + 1e-5)
        * params["g_norm"]["scale"][None, None, None, :]
    )
    o = o.reshape(B, T, D) * jax.nn.swish(lin("g_proj", x))
    assert_close(y, lin("o_proj", o), tol=1e-4)


def test_causal_depthwise_conv_matches_direct_sum_and_is_causal():
    x = _x(2, 9, 5)
    w = jax.random.normal(jax.random.key(3), (4, 5))
    y = causal_depthwise_conv1d(x, w)
    xp = np.pad(np.asarray(x), ((0, 0), (3, 0), (0, 0)))
    wn = np.asarray(w)
    ref = sum(wn[i] * xp[:, i : i + 9] for i in range(4))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    y2 = causal_depthwise_conv1d(x.at[:, 6:].set(100.0), w)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])  # the future does not leak


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_decode_with_cache_equals_full_sequence(use_short_conv):
    """Prompt (chunked, > 16 tokens) then token-by-token decoding == one parallel pass."""
    x = _x(2, 27, 32, seed=4)
    layer = GatedLinearAttention(num_heads=2, use_short_conv=use_short_conv)
    params = layer.init(jax.random.key(5), x)["params"]
    y_full = layer.apply({"params": params}, x)
    dec = layer.clone(decode=True)
    cache = dec.init(jax.random.key(0), x[:, :1])["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    P = 20
    y, upd = dec.apply({"params": params, "cache": cache}, x[:, :P], mutable=["cache"])
    outs = [y]
    cache = upd["cache"]
    for t in range(P, 27):
        y, upd = dec.apply({"params": params, "cache": cache}, x[:, t : t + 1], mutable=["cache"])
        cache = upd["cache"]
        outs.append(y)
    assert_close(jnp.concatenate(outs, axis=1), y_full, tol=1e-4)


def test_short_conv_decode_cache_holds_last_inputs():
    conv = ShortConvolution(decode=True)
    x = _x(1, 6, 4)
    variables = conv.init(jax.random.key(0), x[:, :1])
    _, upd = conv.apply(variables, x, mutable=["cache"])
    np.testing.assert_array_equal(upd["cache"]["prefix"], x[:, -3:])


def test_dtype_implementation_passthrough_and_gradients():
    x = _x(2, 18, 32, seed=6)
    layer = GatedLinearAttention(num_heads=4, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(7), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    ref_layer = GatedLinearAttention(num_heads=4, implementation="reference")
    xla_layer = GatedLinearAttention(num_heads=4, implementation="xla")
    v32 = ref_layer.init(jax.random.key(7), x)
    assert_close(xla_layer.apply(v32, x), ref_layer.apply(v32, x), tol=1e-4)
    grads = jax.grad(lambda v: jnp.sum(xla_layer.apply(v, x) ** 2))(v32)
    leaves = jax.tree.leaves(nn.unbox(grads))
    assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)


def test_bad_head_count_raises():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GatedLinearAttention(num_heads=3).init(jax.random.key(0), _x(1, 4, 32))


def test_swiglu_formula_and_sizing():
    x = _x(2, 3, 8)
    mlp = SwiGLU(hidden_size=16)
    p = nn.unbox(mlp.init(jax.random.key(0), x)["params"])
    k = lambda n: p[n]["kernel"]
    ref = (jax.nn.silu(x @ k("gate")) * (x @ k("up"))) @ k("down")
    assert_close(mlp.apply({"params": p}, x), ref, tol=1e-5)
    assert swiglu_hidden_size(1024) == 2816  # fla's 340M GLA: 2/3 · 4 · 1024 -> 2816


def test_gla_block_residual_shapes():
    x = _x(2, 10, 32)
    block = GLABlock(num_heads=2, mlp_hidden_size=64)
    y, v = block.init_with_output(jax.random.key(0), x)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert set(nn.unbox(v["params"])) == {"attn_norm", "attn", "mlp_norm", "mlp"}


def test_empty_sequence_and_bad_input_shapes():
    layer = GatedLinearAttention(num_heads=2)
    x = _x(3, 4, 32)
    params = layer.init(jax.random.key(0), x)
    assert layer.apply(params, x[:, :0]).shape == (3, 0, 32)  # T = 0: an empty output
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\] \(rank 3\), got shape \(4, 32\)"):
        layer.apply(params, x[0])
    with pytest.raises(ValueError, match=r"B >= 1 and D >= 1, got shape \(0, 4, 32\)"):
        layer.apply(params, x[:0])
