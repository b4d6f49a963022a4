"""ResNet-18/34/50 and MobileNetV2 on ConvBN: torchvision topology, modes, options, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.interop import timm as timm_interop
from jaxblocks.interop.timm import load_timm_state_dict
from jaxblocks.layers.conv_bn import convbn_mode, fold_for_deploy
from jaxblocks.models.mobilenet import InvertedResidual, MobileNetV2, make_divisible
from jaxblocks.models.resnet import RESNET_PRESETS, ResNet, ResNetConfig
from jaxblocks.registry import create_model
from tests.kernels.harness import assert_close

# torchvision.models.<name>(num_classes=1000): sum(p.numel() for p in model.parameters()).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
}
MODE_TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _init(model, x, seed: int = 0):
    return nn.unbox(jit(model.init)(jax.random.key(seed), x))


def _abstract_init(model, shape=(1, 64, 64, 3)):
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape)))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_equals_torchvision(name):
    variables = _abstract_init(create_model(name, num_classes=1000))
    assert _count(variables["params"]) == TORCHVISION_PARAMS[name]
    # Running statistics are not parameters (torchvision's buffers): mean and var per BN channel.
    assert _count(variables["batch_stats"]) == 2 * _count(_bn_scales(variables["params"]))


def _bn_scales(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [x for path, x in flat if path[-1].key == "scale"]


def test_resnet_parameter_names_follow_torchvision():
    p18 = _abstract_init(create_model("resnet18"))["params"]
    assert {"conv1", "fc", "layer1_0", "layer4_1"} <= set(p18)
    assert "layer1_0" in p18 and "downsample" not in p18["layer1_0"]
    assert "downsample" in p18["layer2_0"] and "downsample" not in p18["layer2_1"]
    assert set(p18["layer1_0"]) == {"conv1", "conv2"}
    assert p18["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert p18["fc"]["kernel"].shape == (512, 1000)
    p50 = _abstract_init(create_model("resnet50"))["params"]
    # Bottleneck: 64 -> 256 channels, so the first block of stage 1 already has a projection.
    assert set(p50["layer1_0"]) == {"conv1", "conv2", "conv3", "downsample"}
    assert p50["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert p50["fc"]["kernel"].shape == (2048, 1000)


def test_resnet_spatial_sizes_match_pytorch_padding():
    # torchvision on 225x225: 7x7/2 p3 -> 113, maxpool 3/2 p1 -> 57, then 29, 15, 8.
    model = create_model("resnet18")
    x = jnp.zeros((1, 225, 225, 3))
    variables = _abstract_init(model, x.shape)

    def run(v, x):
        with convbn_mode("eval"):
            return model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    _, inter = jax.eval_shape(run, variables, x)
    inter = inter["intermediates"]
    assert inter["conv1"]["__call__"][0].shape == (1, 113, 113, 64)
    sizes = [inter[f"layer{i}_1"]["__call__"][0].shape for i in range(1, 5)]
    assert sizes == [(1, 57, 57, 64), (1, 29, 29, 128), (1, 15, 15, 256), (1, 8, 8, 512)]


def test_small_stem_and_feature_output():
    model = ResNet.from_config(RESNET_PRESETS["resnet18"], num_classes=0, width=8, stem="small")
    x = jnp.zeros((2, 16, 16, 1))
    v = _abstract_init(model, x.shape)
    assert v["params"]["conv1"]["kernel"].shape == (3, 3, 1, 8)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, mode="eval"), v, x)
    assert out.shape == (2, 64)  # 8 * 2**3 pooled features, no head
    mb = MobileNetV2(num_classes=0, width_multiplier=0.5)
    out = jax.eval_shape(
        lambda v, x: mb.apply(v, x, mode="eval"),
        _abstract_init(mb, (2, 32, 32, 3)),
        jnp.zeros((2, 32, 32, 3)),
    )
    assert out.shape == (2, 1280)  # the last layer keeps 1280 channels below width 1.0


def test_mobilenet_depthwise_and_width_multiplier():
    p = _abstract_init(MobileNetV2(width_multiplier=0.5))["params"]
    assert p["features_0"]["kernel"].shape == (3, 3, 3, 16)
    # Block 1 (t=1): no expansion; depthwise 3x3 kernel has one input channel per group.
    assert set(p["features_1"]) == {"depthwise", "project"}
    assert p["features_1"]["depthwise"]["kernel"].shape == (3, 3, 1, 16)
    assert p["features_2"]["expand"]["kernel"].shape == (1, 1, 8, 48)
    assert p["features_2"]["depthwise"]["kernel"].shape == (3, 3, 1, 48)
    assert [make_divisible(v) for v in (32 * 0.5, 24 * 0.35, 1280 * 1.4)] == [16, 8, 1792]


def test_zero_init_residual():
    kw = dict(stage_sizes=(1,), num_classes=4, width=4, stem="small")
    x = jnp.ones((1, 8, 8, 3))
    p = _init(ResNet(block="bottleneck", zero_init_residual=True, **kw), x)["params"]
    np.testing.assert_array_equal(p["layer1_0"]["conv3"]["scale"], 0.0)
    np.testing.assert_array_equal(p["layer1_0"]["conv2"]["scale"], 1.0)
    np.testing.assert_array_equal(p["layer1_0"]["downsample"]["scale"], 1.0)
    q = _init(ResNet(block="basic", zero_init_residual=True, **kw), x)["params"]
    np.testing.assert_array_equal(q["layer1_0"]["conv2"]["scale"], 0.0)
    np.testing.assert_array_equal(q["layer1_0"]["conv1"]["scale"], 1.0)
    r = _init(ResNet(block="basic", **kw), x)["params"]
    np.testing.assert_array_equal(r["layer1_0"]["conv2"]["scale"], 1.0)


class _InvertedResiduals(nn.Module):
    """MobileNetV2's three block kinds: no expansion, strided, and with the residual add."""

    @nn.compact
    def __call__(self, x, mode=None):
        x = InvertedResidual(8, expand_ratio=1)(x, mode)
        x = InvertedResidual(8, strides=2)(x, mode)
        return InvertedResidual(8)(x, mode)


def _small_models():
    return {
        "resnet18": ResNet(stage_sizes=(1, 1), block="basic", num_classes=3, width=8, stem="small"),
        # imagenet stem (7x7/2 + max-pool) and bottlenecks with projections.
        "resnet50": ResNet(stage_sizes=(1, 1), block="bottleneck", num_classes=3, width=4),
        "mobilenet_v2": _InvertedResiduals(),
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_tune_equals_eval_outputs_and_gradients(name):
    model = _small_models()[name]
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = _init(model, x)
    _, updates = jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(variables, x)
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    params = jax.tree.map(  # non-trivial BN affine parameters
        lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape) if p.ndim == 1 else p,
        variables["params"],
    )
    stats = updates["batch_stats"]  # real running statistics

    def loss(params, x, mode):
        with convbn_mode(mode):
            out = model.apply({"params": params, "batch_stats": stats}, x)
        w = jax.random.normal(jax.random.key(3), out.shape)  # a random cotangent
        return jnp.sum(out * w), out

    grad = jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_eval, gx_eval), out_eval = grad(params, x, "eval")
    (g_tune, gx_tune), out_tune = grad(params, x, "tune")
    assert_close(out_tune, out_eval, tol=MODE_TOL, name="outputs")
    assert_close(g_tune, g_eval, tol=MODE_TOL, name="param grads")
    assert_close(gx_tune, gx_eval, tol=MODE_TOL, name="input grad")
    out_deploy = jit(lambda v, x: model.apply(v, x, mode="deploy"))(
        fold_for_deploy({"params": params, "batch_stats": stats}), x
    )
    assert_close(out_deploy, out_eval, tol=MODE_TOL, name="deploy outputs")


def test_train_kwarg_and_mode_precedence():
    model = _small_models()["resnet18"]
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    v = _init(model, x)
    out_train, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    ref_train, _ = model.apply(v, x, mode="train", mutable=["batch_stats"])
    np.testing.assert_array_equal(out_train, ref_train)
    np.testing.assert_array_equal(model.apply(v, x, train=False), model.apply(v, x, mode="eval"))
    # train=False inside a deploy context keeps deploy (eval would reject folded variables).
    folded = fold_for_deploy(v)
    with convbn_mode("deploy"):
        out = model.apply(folded, x, train=False)
    assert_close(out, model.apply(v, x, mode="eval"), tol=MODE_TOL)
    with pytest.raises(ValueError, match="deploy"):
        model.apply(folded, x, train=False)
    out_eval = model.apply(v, x, mode="eval")
    # 1. the call argument wins over train=, the context and the attribute
    with convbn_mode("train"):
        np.testing.assert_array_equal(model.clone(mode="train").apply(v, x, "eval", train=True),
                                      out_eval)  # fmt: skip
    # 2. train=True over context and attribute; train=False keeps a running-statistics attribute
    with convbn_mode("eval"):
        out, _ = model.clone(mode="eval").apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, out_train)
    assert_close(model.clone(mode="tune").apply(v, x, train=False), out_eval, tol=MODE_TOL)
    np.testing.assert_array_equal(model.clone(mode="train").apply(v, x, train=False), out_eval)
    # 3. the context over the attribute; 4. the attribute
    with convbn_mode("eval"):
        np.testing.assert_array_equal(model.clone(mode="train").apply(v, x), out_eval)
    np.testing.assert_array_equal(model.clone(mode="eval").apply(v, x), out_eval)
    # 5. nothing asked: train with mutable batch_stats, else an error naming the model
    out, _ = model.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, out_train)
    with pytest.raises(ValueError, match=r"ResNet: no ConvBN mode .*mode='eval'"):
        model.apply(v, x)
    mb = MobileNetV2(num_classes=3, width_multiplier=0.25)
    xm = jnp.zeros((1, 32, 32, 3))
    vm = _abstract_init(mb, xm.shape)
    with pytest.raises(ValueError, match=r"MobileNetV2: no ConvBN mode .*train=False"):
        jax.eval_shape(lambda v: mb.apply(v, xm), vm)


def test_registry_resnet_without_a_mode_or_mutable_is_an_error():
    model, x = (
        create_model("resnet18", num_classes=3, width=8, stem="small"),
        jnp.ones((1, 8, 8, 3)),
    )
    v = _abstract_init(model, x.shape)
    with pytest.raises(ValueError, match=r"ResNet: no ConvBN mode was asked for.*mutable="):
        jax.eval_shape(lambda v: model.apply(v, x), v)
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), v)
    assert out.shape == (1, 3)


@pytest.mark.parametrize("int_dtype", [jnp.uint8, jnp.int32])
def test_integer_images_are_promoted_like_float32(int_dtype):
    model = _small_models()["resnet50"]  # imagenet stem: the max-pool sees the promoted input
    x_int = jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 255).astype(int_dtype)
    v = _init(model, x_int.astype(jnp.float32))
    for kw in ({"mode": "eval"}, {"mode": "tune"}, {"train": True}):
        got = model.apply(v, x_int, **kw)
        want = model.apply(v, x_int.astype(jnp.float32), **kw)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_bf16_compute_fp32_params():
    kw = dict(stage_sizes=(1, 1), block="basic", num_classes=3, width=8, stem="small")
    model = ResNet(dtype=jnp.bfloat16, **kw)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    v = _init(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))

    def run(v, x):
        with convbn_mode("tune"):
            return model.apply(v, x)

    out = jit(run)(v, x)
    assert out.dtype == jnp.bfloat16
    ref = jit(lambda v, x: ResNet(**kw).apply(v, x, mode="eval"))(v, x)
    assert_close(out, ref, dtype=jnp.bfloat16)


def test_bad_inputs():
    model = _small_models()["resnet18"]
    with pytest.raises(ValueError, match=r"ResNet: x must be NHWC"):
        model.init(jax.random.key(0), jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="stem must be one of"):
        ResNet(stem="tiny").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="block must be one of"):
        ResNet(block="wide").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="MobileNetV2: x must be NHWC"):
        MobileNetV2().init(jax.random.key(0), jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="width_multiplier"):
        MobileNetV2(width_multiplier=0.0).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(TypeError):
        ResNet.from_config(ResNetConfig(), depth=50)
    v = _init(model, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="mode"):
        model.apply(v, jnp.zeros((1, 8, 8, 3)), mode="inference")


NORM_VARIANTS = ("ghost_batch", "evonorm_b0", "evonorm_s0", "group_ws", "bcn_ws")


@pytest.mark.parametrize("norm", NORM_VARIANTS)
def test_norm_variants_train_eval_and_errors(norm):
    from jaxblocks.models.resnet import NORMS_WITH_RUNNING_STATS

    model = ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, num_classes=3,
                   stem="small", norm=norm, ghost_batch_size=2)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    v = _init(model, x)
    assert "conv1" in v["params"] and set(v["params"]["conv1"]) == {"conv", "norm"}
    stateful = norm in NORMS_WITH_RUNNING_STATS
    assert ("batch_stats" in v) == stateful
    out_eval = model.apply(v, x, train=False)
    assert out_eval.shape == (4, 3) and np.all(np.isfinite(out_eval))
    if stateful:
        out_train, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"],
                             v["batch_stats"])  # fmt: skip
        assert all(jax.tree.leaves(moved)), f"{norm}: train did not update the statistics"
        assert float(jnp.max(jnp.abs(out_train - out_eval))) > 1e-4
        with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
            model.apply(v, x, train=True)
        with pytest.raises(ValueError, match="deploy"):
            model.apply(v, x, mode="deploy")
    else:  # stateless norms: the mode changes nothing
        np.testing.assert_array_equal(model.apply(v, x, train=True), out_eval)
    with pytest.raises(ValueError, match="aux_bn=True needs norm='batch'"):
        model.clone(aux_bn=True).apply(v, x, train=False)


def test_bad_norm_name_and_variant_presets():
    with pytest.raises(ValueError, match=r"ResNet: norm must be one of .*'layer'"):
        ResNet(norm="layer", num_classes=2).init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    assert RESNET_PRESETS["resnet50_evonorm_s0"].norm == "evonorm_s0"
    assert RESNET_PRESETS["resnet18_ghost_bn"].ghost_batch_size == 128


def _torchvision_state_dict(variables) -> dict[str, np.ndarray]:
    """torchvision/timm ResNet keys written out by hand from a jaxblocks ResNet's variables."""
    p, s = variables["params"], variables["batch_stats"]
    sd = {}

    def convbn(flax_path, conv_key, bn_key):
        pp, ss = p, s
        for k in flax_path:
            pp, ss = pp[k], ss[k]
        sd[f"{conv_key}.weight"] = np.asarray(pp["kernel"]).transpose(3, 2, 0, 1)
        sd[f"{bn_key}.weight"], sd[f"{bn_key}.bias"] = pp["scale"], pp["bias"]
        sd[f"{bn_key}.running_mean"], sd[f"{bn_key}.running_var"] = ss["mean"], ss["var"]
        sd[f"{bn_key}.num_batches_tracked"] = np.array(7)

    convbn(("conv1",), "conv1", "bn1")
    for block in (k for k in p if k.startswith("layer")):
        layer, idx = block.split("_")
        for conv in (k for k in p[block] if k.startswith("conv")):
            n = conv[len("conv") :]
            convbn((block, conv), f"{layer}.{idx}.{conv}", f"{layer}.{idx}.bn{n}")
        if "downsample" in p[block]:
            pre = f"{layer}.{idx}.downsample"
            convbn((block, "downsample"), f"{pre}.0", f"{pre}.1")
    sd["fc.weight"], sd["fc.bias"] = np.asarray(p["fc"]["kernel"]).T, p["fc"]["bias"]
    return {k: np.array(v) for k, v in sd.items()}


def test_load_torchvision_resnet_state_dict_round_trip(tmp_path):
    kw = {"width": 8, "num_classes": 5}
    model = create_model("resnet18", **kw)
    v = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
    leaves, treedef = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    sd = _torchvision_state_dict(v)
    got = load_timm_state_dict("resnet18", sd, width=8)  # num_classes read from fc.weight
    assert jax.tree.structure(got) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v), strict=True):
        np.testing.assert_array_equal(a, b)
    # the same through files: .npz always, .safetensors with the package's NumPy loader
    np.savez(tmp_path / "r18.npz", **sd)
    paths = [tmp_path / "r18.npz"]
    try:
        from safetensors.numpy import save_file
    except ImportError:
        pass
    else:
        save_file({k: np.ascontiguousarray(a) for k, a in sd.items()}, tmp_path / "r18.safetensors")
        paths.append(tmp_path / "r18.safetensors")
    for path in paths:
        got = timm_interop.load("resnet18", path, width=8)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="must end in .safetensors or .npz"):
        (tmp_path / "r18.pt").write_bytes(b"x")
        timm_interop.load("resnet18", tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="is not a file"):
        timm_interop.read_state_dict(tmp_path / "missing.npz")
    del sd["layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer2.0.downsample.1.running_var"):
        load_timm_state_dict("resnet18", sd, width=8)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_matches_timm_resnet(name):
    import timm
    import torch

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for m in ref.modules():  # non-trivial BN statistics and affine
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    variables = load_timm_state_dict(name, ref.state_dict())
    got = np.asarray(
        create_model(name).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    )
    rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
    assert rel < 1e-4, f"{name}: relative RMS error {rel:.2e} against timm"
