"""MSVMambaBlock: the Nano preset's structure and parameter count, residual form, dtypes,
drop-path, gradients; ConvFFN against its equation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.blocks.msvmamba import ConvFFN, MSVMambaBlock


def _x(shape=(2, 6, 5, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_convffn_matches_its_equation():
    x = _x((1, 4, 4, 8))
    ffn = ConvFFN()
    v = nn.unbox(jax.jit(ffn.init)(jax.random.key(0), x))
    p = v["params"]
    bias = lambda b: b[None, None, None, :]
    h = x @ p["linear1"]["kernel"] + bias(p["linear1"]["bias"])
    dw = jax.lax.conv_general_dilated(
        h,
        p["dwc"]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=16,
    ) + bias(p["dwc"]["bias"])
    want = jax.nn.gelu(h + dw, approximate=False) @ p["linear2"]["kernel"]
    want = want + bias(p["linear2"]["bias"])
    np.testing.assert_allclose(jax.jit(ffn.apply)(v, x), want, rtol=1e-4, atol=1e-5)


def test_nano_block_structure_params_and_gradients():
    C = 48
    block = MSVMambaBlock.nano(implementation="reference")
    x = _x((1, 8, 8, C))
    v = nn.unbox(jax.jit(block.init)(jax.random.key(0), x))
    p = v["params"]
    d = 2 * C  # d_inner
    assert set(p) == {"norm", "op", "norm2", "ffn"}
    scan = p["op"]["_ScanParams_0"]
    assert scan["A_logs"].shape == (4 * d, 1) and scan["x_proj_weight"].shape == (4, 3 + 2, d)
    expected = (
        2 * 2 * C  # two LayerNorms
        + C * 2 * d  # in_proj (no bias)
        + 9 * d
        + d  # DW 3×3
        + 49 * d
        + d  # DW 7×7 stride 2
        + 4 * (5 * d + d * 3 + d)
        + 4 * d
        + 4 * d  # x_proj, dt_projs (w, b), A_logs, Ds
        + 2 * d  # out_norm
        + 2 * d * (d // 8)  # SE
        + d * C  # out_proj
        + C * 2 * C
        + 2 * C
        + 9 * 2 * C
        + 2 * C
        + 2 * C * C
        + C  # ConvFFN
    )
    assert _count(p) == expected
    y = jax.jit(block.apply)(v, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
    g = jax.jit(jax.grad(lambda v: jnp.sum(block.apply(v, x) ** 2)))(v)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))


def test_block_bf16_ss2d_variant_and_drop_path():
    x = _x()
    block = MSVMambaBlock(
        d_state=2, multiscale=False, drop_path=0.5, dtype=jnp.bfloat16, implementation="reference"
    )
    v = jax.jit(block.init)(jax.random.key(0), x)
    y = jax.jit(block.apply)(v, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert "se" not in nn.unbox(v)["params"]["op"]
    # train: each sample either drops a branch or keeps it scaled; outputs differ from eval
    f = jax.jit(lambda v, x, k: block.apply(v, x, train=True, rngs={"dropout": k}))
    y_tr = f(v, x, jax.random.key(3))
    assert y_tr.shape == x.shape and np.all(np.isfinite(np.asarray(y_tr, np.float32)))
    assert not np.allclose(np.asarray(y_tr, np.float32), np.asarray(y, np.float32))
