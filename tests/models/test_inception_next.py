"""InceptionNeXt (arXiv 2303.16900): blocks, model, parameter counts and timm weight import."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.inception_next import (
    ConvNeXtMixer,
    InceptionDWConv2d,
    MetaNeXtBlock,
    MlpClassifierHead,
    inception_split_sizes,
)
from jaxblocks.interop.timm import load_timm_state_dict
from jaxblocks.models.inception_next import (
    INCEPTION_NEXT_PRESETS,
    InceptionNeXt,
    InceptionNeXtConfig,
    inception_next_param_count,
)
from jaxblocks.registry import create_model, model_info
from tests.kernels.harness import leaves_changed

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(
    depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), band_kernel_size=9, branch_ratio=0.25, num_classes=7
)


def _init(module, x, seed: int):
    """Unboxed variables (the kernels carry logical axis names) of a jitted init."""
    return nn.unbox(jit(module.init)(jax.random.key(seed), x))


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _perturb(tree, seed: int, scale: float = 0.3):
    """Random values around the initial ones, so layer scale and BN are not near identity."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


@functools.partial(jit, static_argnums=(0, 2))
def _random_variables(model, x, seed: int = 1):
    v = nn.unbox(model.init(jax.random.key(seed), x))
    stats = jax.tree.map(lambda a: a + jnp.abs(_rand(seed, a.shape, 0.3)), v["batch_stats"])
    return {"params": _perturb(v["params"], seed + 1), "batch_stats": stats}


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    "channels, ratio, want",
    [(40, 0.25, (10, 10, 10, 10)), (96, 0.125, (60, 12, 12, 12)), (23, 0.125, (17, 2, 2, 2))],
)
def test_split_sizes(channels, ratio, want):
    assert inception_split_sizes(channels, ratio) == want


def test_split_sizes_rejects_too_few_channels():
    with pytest.raises(ValueError, match="channels=7 with branch_ratio=0.125"):
        inception_split_sizes(7, 0.125)
    with pytest.raises(ValueError, match="branch_ratio"):
        inception_split_sizes(16, 0.5)


def _dwconv_ref(x, kernel, bias):
    """Depthwise conv, stride 1, 'same' zero padding for odd kernels (kernel [kh, kw, 1, C])."""
    kh, kw = kernel.shape[:2]
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        precision="highest",
    )  # fmt: skip
    return y + bias.reshape(1, 1, 1, -1)


def test_inception_dwconv_branches_in_timm_order():
    mixer = InceptionDWConv2d(square_kernel_size=3, band_kernel_size=5, branch_ratio=0.125)
    x = _rand(0, (2, 7, 9, 24))  # C = 24: split (15, 3, 3, 3), non-square input
    params = _perturb(_init(mixer, x, 1)["params"], 2)
    assert params["dwconv_hw"]["kernel"].shape == (3, 3, 1, 3)
    assert params["dwconv_w"]["kernel"].shape == (1, 5, 1, 3)
    assert params["dwconv_h"]["kernel"].shape == (5, 1, 1, 3)
    y = jit(mixer.apply)({"params": params}, x)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y[..., :15], x[..., :15])  # identity group untouched
    for name, sl in (("dwconv_hw", slice(15, 18)), ("dwconv_w", slice(18, 21)),
                     ("dwconv_h", slice(21, 24))):  # fmt: skip
        want = _dwconv_ref(x[..., sl], params[name]["kernel"], params[name]["bias"])
        np.testing.assert_allclose(y[..., sl], want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_inception_dwconv_bad_input():
    mixer = InceptionDWConv2d()
    with pytest.raises(ValueError, match=r"\[B, H, W, C\].*\(8, 8, 16\)"):
        mixer.init(jax.random.key(0), jnp.ones((8, 8, 16)))
    with pytest.raises(ValueError, match="band_kernel_size must be odd"):
        InceptionDWConv2d(band_kernel_size=10).init(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    with pytest.raises(ValueError, match="channels=4"):
        mixer.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))


def _applier(module, **kwargs):
    """``module.apply`` jitted with its keyword arguments fixed."""
    return jit(functools.partial(module.apply, **kwargs))


def test_block_residual_and_layer_scale():
    block = MetaNeXtBlock(token_mixer=functools.partial(InceptionDWConv2d, branch_ratio=0.25))
    x = _rand(0, (2, 6, 6, 16))
    v = _init(block, x, 1)
    np.testing.assert_allclose(v["params"]["gamma"], jnp.full((16,), 1e-6))
    params = _perturb(v["params"], 2)
    v = {"params": params, "batch_stats": v["batch_stats"]}
    evaluate = _applier(block)
    y = evaluate(v, x)
    assert float(jnp.max(jnp.abs(y - x))) > 1e-2
    zero = {**v, "params": {**params, "gamma": jnp.zeros_like(params["gamma"])}}
    np.testing.assert_array_equal(evaluate(zero, x), x)  # the branch is scaled by gamma
    # Train mode updates the running statistics (Flax decay 0.9 = torch momentum 0.1).
    _, upd = _applier(block, train=True, mutable=["batch_stats"])(v, x)
    mixer = InceptionDWConv2d(branch_ratio=0.25)
    mixed = jit(mixer.apply)({"params": params["token_mixer"]}, x)
    mean = jnp.mean(mixed, axis=(0, 1, 2))
    np.testing.assert_allclose(upd["batch_stats"]["norm"]["mean"], 0.1 * mean, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_block_drop_path():
    block = MetaNeXtBlock(drop_path=0.5)
    x = _rand(0, (16, 4, 4, 16))
    v = _init(block, x, 1)
    v = {**v, "params": {**v["params"], "gamma": jnp.ones((16,))}}
    train = dict(train=True, mutable=["batch_stats"])
    y, _ = _applier(block, deterministic=False, **train)(v, x, rngs={"dropout": jax.random.key(3)})
    y_det, _ = _applier(block, deterministic=True, **train)(v, x)
    dropped = jnp.all(jnp.isclose(y, x, atol=1e-6), axis=(1, 2, 3))
    assert 0 < int(dropped.sum()) < 16, "drop path should drop some samples, not all"
    kept = ~dropped
    # kept samples: x + branch / (1 - rate)
    np.testing.assert_allclose(y[kept], x[kept] + 2 * (y_det - x)[kept], rtol=1e-4, atol=1e-5)
    # eval: no drop path, no rng needed
    assert _applier(block)(v, x).shape == x.shape


def test_head():
    head = MlpClassifierHead(num_classes=5, mlp_ratio=3)
    x = _rand(0, (2, 3, 3, 8))
    v = _init(head, x, 1)
    assert v["params"]["fc1"]["kernel"].shape == (8, 24)
    assert v["params"]["fc2"]["kernel"].shape == (24, 5)
    p = _perturb(v["params"], 2)
    row = lambda a: a[None, :]  # [K] -> [1, K], explicit broadcasting
    h = jnp.mean(x, axis=(1, 2)) @ p["fc1"]["kernel"] + row(p["fc1"]["bias"])
    h = jax.nn.gelu(h, approximate=False)
    mu, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-6) * row(p["norm"]["scale"]) + row(p["norm"]["bias"])
    want = h @ p["fc2"]["kernel"] + row(p["fc2"]["bias"])
    np.testing.assert_allclose(jit(head.apply)({"params": p}, x), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny():
    model = InceptionNeXt(**TINY)
    x = _rand(0, (2, 32, 32, 3))
    return model, x, _random_variables(model, x)


def test_tiny_forward_and_grad(tiny):
    model, x, v = tiny
    logits = jit(functools.partial(model.apply, train=False))(v, x)
    assert logits.shape == (2, 7) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-3

    def loss(params):
        out, upd = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out)), upd

    (value, upd), grads = jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    assert np.isfinite(float(value))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.max(jnp.abs(grads["stem_0"]["kernel"]))) > 0
    assert float(jnp.max(jnp.abs(grads["stages_3"]["blocks_0"]["gamma"]))) > 0
    moved = leaves_changed(upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"


def test_train_flag_required_when_stats_are_immutable(tiny):
    model, x, v = tiny
    with pytest.raises(ValueError, match="train=False"):
        model.apply(v, x)
    with pytest.raises(ValueError, match=r"too small.*at least 32"):
        model.apply(v, x[:, :16, :16], train=False)
    with pytest.raises(ValueError, match="dims must have one positive entry"):
        InceptionNeXtConfig(depths=(1, 1), dims=(8, 16, 32), mlp_ratios=(4, 4))


def test_param_counts_match_published():
    info = model_info("inception_next_atto")
    model = create_model("inception_next_atto")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    assert n == info.published_params == 4_156_520
    for name, config in INCEPTION_NEXT_PRESETS.items():
        assert inception_next_param_count(config) == model_info(name).published_params, name


# ----------------------------------------------------------------------------- timm interop


def _timm_layout_state_dict(variables, depths) -> dict[str, np.ndarray]:
    """The timm state dict of ``variables``, written out by hand from timm's MetaNeXt names."""
    p, s = variables["params"], variables["batch_stats"]
    sd: dict[str, np.ndarray] = {}
    conv = lambda a: np.transpose(np.asarray(a), (3, 2, 0, 1))  # HWIO -> OIHW

    def bn(prefix, pp, ss):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = np.asarray(pp["scale"]), pp["bias"]
        sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"] = ss["mean"], ss["var"]
        sd[f"{prefix}.num_batches_tracked"] = np.array(3)

    sd["stem.0.weight"], sd["stem.0.bias"] = conv(p["stem_0"]["kernel"]), p["stem_0"]["bias"]
    bn("stem.1", p["stem_1"], s["stem_1"])
    for i, depth in enumerate(depths):
        ps, ss = p[f"stages_{i}"], s[f"stages_{i}"]
        if i > 0:
            bn(f"stages.{i}.downsample.0", ps["downsample_0"], ss["downsample_0"])
            sd[f"stages.{i}.downsample.1.weight"] = conv(ps["downsample_1"]["kernel"])
            sd[f"stages.{i}.downsample.1.bias"] = ps["downsample_1"]["bias"]
        for j in range(depth):
            pb, sb, pre = ps[f"blocks_{j}"], ss[f"blocks_{j}"], f"stages.{i}.blocks.{j}"
            for name in ("dwconv_hw", "dwconv_w", "dwconv_h"):
                sd[f"{pre}.token_mixer.{name}.weight"] = conv(pb["token_mixer"][name]["kernel"])
                sd[f"{pre}.token_mixer.{name}.bias"] = pb["token_mixer"][name]["bias"]
            bn(f"{pre}.norm", pb["norm"], sb["norm"])
            for fc in ("fc1", "fc2"):
                sd[f"{pre}.mlp.{fc}.weight"] = conv(pb["mlp"][fc]["kernel"])
                sd[f"{pre}.mlp.{fc}.bias"] = pb["mlp"][fc]["bias"]
            sd[f"{pre}.gamma"] = pb["gamma"]
    for fc in ("fc1", "fc2"):
        sd[f"head.{fc}.weight"] = np.asarray(p["head"][fc]["kernel"]).T
        sd[f"head.{fc}.bias"] = p["head"][fc]["bias"]
    sd["head.norm.weight"], sd["head.norm.bias"] = (
        p["head"]["norm"]["scale"],
        p["head"]["norm"]["bias"],
    )
    return {k: np.array(v) for k, v in sd.items()}


def test_load_timm_state_dict_round_trip(tiny):
    _, _, v = tiny
    overrides = {k: val for k, val in TINY.items() if k != "num_classes"}
    sd = _timm_layout_state_dict(v, TINY["depths"])
    got = load_timm_state_dict("inception_next_atto", sd, **overrides)  # num_classes from fc2
    assert jax.tree.structure(got) == jax.tree.structure(v)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(v), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_load_timm_state_dict_errors(tiny):
    _, _, v = tiny
    overrides = {k: val for k, val in TINY.items() if k != "num_classes"}
    sd = _timm_layout_state_dict(v, TINY["depths"])
    del sd["stages.2.blocks.1.gamma"]
    sd["stages.9.extra.weight"] = np.zeros(3, np.float32)
    sd["stem.0.weight"] = sd["stem.0.weight"][:, :2]
    with pytest.raises(ValueError) as err:
        load_timm_state_dict("inception_next_atto", sd, **overrides)
    msg = str(err.value)
    assert "missing keys (1): stages.2.blocks.1.gamma" in msg
    assert "unexpected keys (1): stages.9.extra.weight" in msg
    assert "stem.0.weight (8, 2, 4, 4) -> (4, 4, 2, 8), expected (4, 4, 3, 8)" in msg
    with pytest.raises(ValueError, match="'mobilenet_v2' has no timm mapping"):
        load_timm_state_dict("mobilenet_v2", sd)


@pytest.mark.torch
def test_matches_timm_inception_next_atto():
    import timm
    import torch

    torch.manual_seed(0)
    ref = timm.create_model("inception_next_atto", pretrained=False).eval()
    with torch.no_grad():
        for m in ref.modules():  # non-trivial BN statistics, affine and layer scale
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, torch.nn.Parameter):
                gamma.normal_(0.0, 0.5)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    variables = load_timm_state_dict("inception_next_atto", ref.state_dict())
    model = create_model("inception_next_atto")
    got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False))
    assert got.shape == want.shape == (1, 1000)
    rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
    assert rel < 1e-4, f"relative RMS error {rel:.2e}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_convnext_token_mixer_swaps_only_the_mixer():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model = create_model("inception_next_atto", **TINY, token_mixer=ConvNeXtMixer)
    v = nn.unbox(model.init(jax.random.key(1), x))
    mixer = v["params"]["stages_1"]["blocks_0"]["token_mixer"]
    assert set(mixer) == {"dwconv"} and mixer["dwconv"]["kernel"].shape == (
        7,
        7,
        1,
        TINY["dims"][1],
    )
    ref = nn.unbox(create_model("inception_next_atto", **TINY).init(jax.random.key(1), x))
    strip = lambda p: {k: w for k, w in p.items() if k != "token_mixer"}  # noqa: E731
    assert jax.tree.structure(strip(v["params"]["stages_1"]["blocks_0"])) == jax.tree.structure(
        strip(ref["params"]["stages_1"]["blocks_0"])
    )
    # the mixer is a plain 7x7 depthwise conv: compare with lax on one block's input
    y = ConvNeXtMixer().apply({"params": mixer}, x[..., :1].repeat(TINY["dims"][1], -1))
    k = mixer["dwconv"]["kernel"]
    want = jax.lax.conv_general_dilated(
        x[..., :1].repeat(TINY["dims"][1], -1), k, (1, 1), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=TINY["dims"][1],
        precision="highest",
    ) + mixer["dwconv"]["bias"][None, None, None]  # fmt: skip
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    out = model.apply(v, x, train=False)
    assert out.shape == (2, TINY["num_classes"]) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvNeXtMixer(kernel_size=4).init(jax.random.key(0), x)
