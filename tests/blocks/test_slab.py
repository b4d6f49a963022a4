"""SLAB-DeiT block: train/eval, PRepBN schedule inside the block, deploy-time fold."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.slab import SLABBlock, fold_slab_block
from jaxblocks.layers.norm import PRepBN
from tests.kernels.harness import assert_close


def _train(blk, v, x, steps):
    for _ in range(steps):
        _, upd = blk.apply(v, x, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
    return v


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_slab_block_train_eval_and_fold(dtype):
    x = (jax.random.normal(jax.random.key(0), (2, 16, 12)) + 0.3).astype(dtype)
    blk = SLABBlock(num_heads=3, norm=functools.partial(PRepBN, total_steps=2), dtype=dtype)
    v = blk.init(jax.random.key(1), x, train=True)
    y, upd = blk.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.shape == x.shape and y.dtype == dtype
    assert int(upd["batch_stats"]["norm1"]["step"]) == 1
    v = _train(blk, v, x, 3)  # past the schedule: lambda = 0, pure RepBN
    # after the schedule, training output = RepBN with batch stats; eval = running stats
    y_eval = blk.apply(v, x, train=False)
    folded = fold_slab_block(v)
    y_dep = SLABBlock(num_heads=3, deploy=True, dtype=dtype).apply(folded, x)
    assert "norm1" not in folded["params"]
    assert_close(y_dep, y_eval, dtype=dtype)

    def loss(p):
        out, _ = blk.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out.astype(jnp.float32) ** 2)

    g = jax.grad(loss)(v["params"])
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(g))


def test_slab_block_explicit_step_and_ln_start():
    x = jax.random.normal(jax.random.key(0), (1, 9, 6))
    blk = SLABBlock(num_heads=2, mlp_ratio=2.0)
    v = blk.init(jax.random.key(1), x, train=True)
    # at step 0 the norms are pure LayerNorm; a big step makes them pure RepBN
    y0, u0 = blk.apply(v, x, train=True, step=0, mutable=["batch_stats"])
    y_end, _ = blk.apply(v, x, train=True, step=10**6, mutable=["batch_stats"])
    assert int(u0["batch_stats"]["norm1"]["step"]) == 0
    assert not np.allclose(np.asarray(y0), np.asarray(y_end))
    # qkv without bias still folds exactly (deploy keeps the folded bias)
    blk_nb = SLABBlock(num_heads=2, qkv_bias=False, norm=functools.partial(PRepBN, total_steps=1))
    vb = _train(blk_nb, blk_nb.init(jax.random.key(1), x, train=True), x, 2)
    y_eval = blk_nb.apply(vb, x, train=False)
    y_dep = SLABBlock(num_heads=2, qkv_bias=False, deploy=True).apply(fold_slab_block(vb), x)
    assert_close(y_dep, y_eval, tol=1e-5)


def test_slab_deit_tiny_block_shapes_and_parameter_count():
    # SLAB-DeiT-T: C = 192, 3 heads, MLP ratio 4, 14x14 tokens (abstract init only)
    c, n, d = 192, 196, 64
    x = jax.ShapeDtypeStruct((2, n, c), jnp.float32)
    blk = SLABBlock(num_heads=3)
    v = jax.eval_shape(lambda x: blk.init(jax.random.key(0), x, train=True), x)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
    attn = (c * 3 * c + 3 * c) + (c * c + c) + n * c + (5 * 5 * d + d)  # qkv, proj, pos, dwc
    mlp = (c * 4 * c + 4 * c) + (4 * c * c + c)
    norms = 2 * (2 * c + 2 * c + 1)  # each PRepBN: LN scale/bias + BN scale/bias + alpha
    assert count == attn + mlp + norms
    out = jax.eval_shape(lambda v, x: blk.apply(v, x, train=False), v, x)
    assert out.shape == (2, n, c)


def _norm1_out(blk, x):
    v = blk.init(jax.random.key(1), x, train=True)
    # step 0: lambda = 1, the norm is its LayerNorm alone (scale 1, bias 0 at init)
    _, state = blk.apply(
        v,
        x,
        train=True,
        step=0,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    return np.asarray(state["intermediates"]["norm1"]["__call__"][0], np.float64)


def _layer_norm(x, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def test_slab_block_layernorm_epsilon_deit_default_and_swin():
    # per-token variance ~1e-6, so eps 1e-6 and 1e-5 give clearly different outputs
    x = jax.random.normal(jax.random.key(0), (2, 9, 6)) * 1e-3
    assert SLABBlock.ln_epsilon == 1e-6  # SLAB-DeiT (official slab_deit.py)
    for blk, eps in [
        (SLABBlock(num_heads=2), 1e-6),
        (SLABBlock(num_heads=2, ln_epsilon=1e-5), 1e-5),  # SLAB-Swin (PyTorch default)
        (SLABBlock(num_heads=2, ln_epsilon=None), 1e-5),  # the factory's own (PRepBN: 1e-5)
        (
            SLABBlock(
                num_heads=2, ln_epsilon=None, norm=functools.partial(PRepBN, ln_epsilon=3e-6)
            ),
            3e-6,
        ),
    ]:
        got = _norm1_out(blk, x)
        np.testing.assert_allclose(got, _layer_norm(x, eps), rtol=1e-4, atol=1e-5)
        other = 1e-5 if eps != 1e-5 else 1e-6
        assert np.max(np.abs(got - _layer_norm(x, other))) > 0.05
    with pytest.raises(ValueError, match="ln_epsilon=0"):
        SLABBlock(num_heads=2, ln_epsilon=0).init(jax.random.key(1), x, train=True)


def test_prepbn_rms_norm_kind_against_formula():
    # LLaMA variant: RMSNorm (no mean, no bias) mixed with RepBN; eps 1e-6 for both.
    from jaxblocks.layers.norm.repbn import prepbn_lambda

    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 2.0 + 0.5
    m = PRepBN(total_steps=4, norm_kind="rms", ln_epsilon=1e-6, bn_epsilon=1e-6)
    v = m.init(jax.random.key(1), x, use_running_average=False)
    assert set(v["params"]) == {"rms", "repbn"} and set(v["params"]["rms"]) == {"scale"}
    gamma = jax.random.normal(jax.random.key(2), (8,))
    v = {**v, "params": {**v["params"], "rms": {"scale": gamma}}}
    xs = np.asarray(x, np.float64)
    rms = xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(gamma)
    flat = xs.reshape(-1, 8)
    bn = (xs - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-6) + xs  # BN (scale 1, bias 0) + α·x
    for step in (0, 1, 3):
        y, _ = m.apply(v, x, use_running_average=False, step=step, mutable=["batch_stats"])
        lam = float(prepbn_lambda(step, 4))
        np.testing.assert_allclose(y, lam * rms + (1 - lam) * bn, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm_kind"):
        PRepBN(norm_kind="group").init(jax.random.key(1), x, use_running_average=False)


def test_prepbn_eval_mode_init_creates_the_training_norm():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    for kind in ("layer", "rms"):
        m = PRepBN(norm_kind=kind)
        v_eval = jax.eval_shape(
            lambda x, m=m: m.init(jax.random.key(1), x, use_running_average=True), x
        )
        v_train = jax.eval_shape(
            lambda x, m=m: m.init(jax.random.key(1), x, use_running_average=False), x
        )
        assert jax.tree.structure(v_eval) == jax.tree.structure(v_train)


def test_swin_window_attention_shifted_mask_against_numpy():
    from jaxblocks.blocks.slab import (
        SwinWindowAttention,
        shifted_window_mask,
        swin_relative_position_index,
    )

    win, heads, c, nw = 2, 2, 4, 4  # a 4x4 map in 2x2 windows, shift 1
    x = jax.random.normal(jax.random.key(0), (2 * nw, win * win, c))
    mask = shifted_window_mask(4, 4, win, 1)
    attn = SwinWindowAttention(heads, win)
    v = attn.init(jax.random.key(1), x, jnp.asarray(mask))
    y = attn.apply(v, x, jnp.asarray(mask))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    xs = np.asarray(x, np.float64)
    qkv = xs @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    q, k, vv = np.split(qkv.reshape(2 * nw, win * win, 3, heads, c // heads), 3, axis=2)
    q, k, vv = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, vv))  # [B, H, N, D]
    rel = p["relative_position_bias_table"][swin_relative_position_index(win)]  # [N, N, H]
    logits = q @ k.transpose(0, 1, 3, 2) * (c // heads) ** -0.5 + rel.transpose(2, 0, 1)[None]
    logits = logits + np.tile(mask, (2, 1, 1))[:, None]
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    out = (a @ vv).transpose(0, 2, 1, 3).reshape(2 * nw, win * win, c)
    expect = out @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    # the mask separates tokens from different regions of the rolled map
    assert (mask == -100).any() and (mask[0] == 0).all()


def test_fold_repbn_into_conv_input_and_output_exact():
    from jaxblocks.blocks.slab import fold_repbn_into_conv_input, fold_repbn_into_conv_output
    from jaxblocks.layers.norm import RepBN

    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    rb = RepBN()
    rv = rb.init(jax.random.key(1), x, use_running_average=False)
    keys = jax.random.split(jax.random.key(2), 4)
    rv = {
        "params": {"alpha": jnp.float32(0.7), "scale": jax.random.normal(keys[0], (3,)),
                   "bias": jax.random.normal(keys[1], (3,))},
        "batch_stats": {"mean": jax.random.normal(keys[2], (3,)),
                        "var": jax.random.uniform(keys[3], (3,), minval=0.5, maxval=2.0)},
    }  # fmt: skip
    conv = nn.Conv(3, (2, 2), strides=(2, 2), padding="VALID")
    cv = conv.init(jax.random.key(3), x)
    ref_in = conv.apply(cv, rb.apply(rv, x, use_running_average=True))
    got_in = conv.apply({"params": fold_repbn_into_conv_input(rv, cv["params"])}, x)
    np.testing.assert_allclose(got_in, ref_in, rtol=1e-5, atol=1e-5)
    ref_out = rb.apply(rv, conv.apply(cv, x), use_running_average=True)
    got_out = conv.apply({"params": fold_repbn_into_conv_output(rv, cv["params"])}, x)
    np.testing.assert_allclose(got_out, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_swin_window_attention_matches_timm():
    torch = pytest.importorskip("torch")
    from timm.models.swin_transformer import WindowAttention

    from jaxblocks.blocks.slab import SwinWindowAttention, shifted_window_mask

    win, heads, c = 2, 2, 8
    x = jax.random.normal(jax.random.key(0), (8, win * win, c))
    mask = shifted_window_mask(4, 4, win, 1)
    ours = SwinWindowAttention(heads, win)
    v = ours.init(jax.random.key(1), x, jnp.asarray(mask))
    ref = WindowAttention(c, num_heads=heads, window_size=(win, win), qkv_bias=True).eval()
    p = v["params"]
    with torch.no_grad():
        for name in ("qkv", "proj"):
            getattr(ref, name).weight.copy_(torch.from_numpy(np.array(p[name]["kernel"]).T))
            getattr(ref, name).bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
        ref.relative_position_bias_table.copy_(
            torch.from_numpy(np.array(p["relative_position_bias_table"]))
        )
        expect = ref(torch.from_numpy(np.array(x)), mask=torch.from_numpy(mask)).numpy()
    y = ours.apply(v, x, jnp.asarray(mask))
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
