"""MCUNet presets and MCUNetV2 receptive-field redistribution: parameter counts of the zoo's
block lists, the redistribution rule, a smaller patch halo with it, patch-based inference equal
to full-image inference, and clear errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.analysis.patch_inference import halo_overhead, patch_apply, trace_geometry
from jaxblocks.models.mcunet import (
    MCUNET_IN2,
    MCUNET_PRESETS,
    MCUNetConfig,
    mcunet_blocks,
    patch_stage_end,
    redistribute_receptive_field,
)
from jaxblocks.models.mobilenet import make_divisible
from jaxblocks.registry import create_model

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY = {"width_multiplier": 0.25, "num_classes": 10}

# Exact counts of the block lists at 1000 classes; the zoo README rounds them to 0.01M.
COUNTS = {
    "mcunet_in0": (749_840, 0.75e6),
    "mcunet_in1": (636_232, 0.64e6),
    "mcunet_in2": (729_392, 0.73e6),
    "mcunet_in3": (737_408, 0.74e6),
    "mcunet_in4": (1_732_640, 1.73e6),
}


def _abstract(model, hw=(32, 32)):
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x))


def _count(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_match_the_model_zoo(name):
    exact, readme = COUNTS[name]
    n = _count(_abstract(create_model(name)))
    assert n == exact
    assert round(n / 1e4) * 1e4 == readme  # the README's 0.01M rounding


def test_redistribution_rule():
    blocks = ((1, 8, 7, 1), (4, 16, 5, 2), (3, 16, 7, 1), (3, 16, 5, 1), (3, 24, 3, 2))
    blocks = (*blocks, (3, 24, 3, 1))
    got = redistribute_receptive_field(blocks, patch_stride=4)
    assert got == (
        (1, 8, 3, 1), (4, 16, 3, 2), (3, 16, 3, 1), (3, 24, 3, 2), (3, 24, 7, 1), (3, 24, 3, 1)
    )  # fmt: skip
    # mcunet-in2 at patch stride 8: 3 blocks leave the patch stage, all kernels there are 3x3
    cfg = MCUNetConfig(MCUNET_IN2, redistribute_rf=True)
    rd = mcunet_blocks(cfg)
    assert len(rd) == len(MCUNET_IN2)
    end = int(patch_stage_end(cfg).split("_")[1])
    assert end == 4 and patch_stage_end(MCUNetConfig(MCUNET_IN2)) == "blocks_7"
    assert all(k == 3 for _, _, k, _ in rd[: end + 1])
    assert [b[2] for b in rd[end + 2 : end + 5]] == [7, 7, 7]
    assert sum(b[3] == 2 for b in rd) == sum(b[3] == 2 for b in MCUNET_IN2)


@pytest.mark.parametrize("name", ["mcunet_in1", "mcunet_in2", "mcunet_in4"])
def test_redistribution_shrinks_the_patch_halo(name):
    res = MCUNET_PRESETS[name].resolution
    size = 64 * -(-res // 64)  # divisible by every stride, as trace_geometry needs
    probe = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    halos = []
    for rd in (False, True):
        m = create_model(name, redistribute_rf=rd, **TINY)
        until = patch_stage_end(m)
        g = trace_geometry(m, _abstract(m, (64, 64)), probe, until=until, train=False)
        out = (-(-res // g.stride[0]),) * 2
        halos.append((g.left[0] + g.right[0], halo_overhead((res, res), out, (3, 3), g)))
    (reach, halo), (reach_rd, halo_rd) = halos
    assert reach_rd < reach and 1.0 < halo_rd < halo


def _perturbed(model, x):
    """Random variables with non-trivial BN affine and statistics, from the shapes only."""
    abstract = _abstract(model, x.shape[1:3])
    rng = np.random.default_rng(7)

    def draw(path, leaf):
        name, shape = str(path[-1]), leaf.shape
        if "kernel" in name:  # He-style scale keeps activations O(1) through the network
            w = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
            return w.astype(np.float32)
        if "var" in name:
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if "scale" in name:
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize(("name", "rd"), [("mcunet_in1", False), ("mcunet_in2", True)])
def test_patch_inference_equals_full_image(name, rd):
    m = create_model(name, redistribute_rf=rd, **TINY)
    x = jax.random.normal(jax.random.key(3), (1, 41, 37, 3))  # odd, non-square
    v = _perturbed(m, x)
    until = patch_stage_end(m)

    def both(v, x):
        full = m.apply(v, x, train=False)
        patched = patch_apply(m, v, x, until=until, patches=(2, 3), train=False)
        return full, patched

    full, patched = jax.jit(both, compiler_options=FAST_COMPILE)(v, x)
    assert float(jnp.std(full)) > 1e-2  # the comparison is not between constants
    np.testing.assert_allclose(patched, full, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    m = create_model("mcunet_in1", **TINY)
    v = _abstract(m)
    with pytest.raises(ValueError, match=r"x must be NHWC.*\(32, 32, 3\)"):
        jax.eval_shape(lambda v, x: m.apply(v, x, train=False), v,
                       jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))  # fmt: skip
    with pytest.raises(ValueError, match="real images, got dtype bool"):
        jax.eval_shape(lambda v, x: m.apply(v, x, train=False), v,
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.bool_))  # fmt: skip
    with pytest.raises(ValueError, match=r"blocks\[1\].*odd kernel.*\(4, 16, 4, 2\)"):
        MCUNetConfig(((1, 8, 3, 1), (4, 16, 4, 2), (3, 24, 3, 2)))
    with pytest.raises(ValueError, match="patch_stride must be a power of 2.*got 6"):
        MCUNetConfig(patch_stride=6)
    with pytest.raises(ValueError, match="patch_stride.*total stride 32, got 32"):
        create_model("mcunet_in1", patch_stride=32)
    with pytest.raises(ValueError, match="width_multiplier must be > 0, got 0"):
        create_model("mcunet_in1", width_multiplier=0.0)
    with pytest.raises(ValueError, match="non-empty sequence"):
        redistribute_receptive_field(())


def test_benchmark_table_reports_the_redistribution():
    from benchmarks import patch_inference as bench

    table = bench.mcunet_table(("mcunet_in1",), (2,), size=48, **TINY)
    rows = [r.split("|")[1:-1] for r in table.strip().splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("mcunet_in1", "no"),
        ("mcunet_in1", "yes"),
    ]
    halo = [float(r[8]) for r in rows]
    extra = [float(r[9].strip(" +%")) for r in rows]
    assert 1.0 < halo[1] < halo[0] and 0.0 < extra[1] < extra[0]
    assert all("blocks_4 (6, 6, 8)" in r[3] for r in rows)


def _torch_mcunet(torch, first: int, blocks, num_classes: int):
    """mit-han-lab/mcunet's ProxylessNASNets topology re-expressed in torch: ``first_conv``,
    ``blocks[i].mobile_inverted_conv`` (inverted_bottleneck / depth_conv / point_linear, each
    conv + BN (+ ReLU6)), identity shortcut when the shape is kept, mean pool, linear."""
    tnn = torch.nn

    def conv_bn(cin, cout, k, s, groups=1, act=True):
        layers = [
            tnn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
            tnn.BatchNorm2d(cout),
        ]
        return tnn.Sequential(*layers, *([tnn.ReLU6()] if act else []))

    class MBInvertedConvLayer(tnn.Module):
        def __init__(self, cin, cout, k, s, e):
            super().__init__()
            mid = round(cin * e)
            self.inverted_bottleneck = conv_bn(cin, mid, 1, 1) if e != 1 else None
            self.depth_conv = conv_bn(mid, mid, k, s, groups=mid)
            self.point_linear = conv_bn(mid, cout, 1, 1, act=False)
            self.shortcut = s == 1 and cin == cout

        def forward(self, x):
            y = self.inverted_bottleneck(x) if self.inverted_bottleneck is not None else x
            y = self.point_linear(self.depth_conv(y))
            return y + x if self.shortcut else y

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.first_conv = conv_bn(3, first, 3, 2)
            cin, mods = first, []
            for e, c, k, s in blocks:
                mods.append(MBInvertedConvLayer(cin, c, k, s, e))
                cin = c
            self.blocks = tnn.ModuleList(mods)
            self.classifier = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.first_conv(x)
            for b in self.blocks:
                x = b(x)
            return self.classifier(x.mean(3).mean(2))

    return Net().eval()


@pytest.mark.torch
def test_matches_the_official_topology_in_torch():
    torch = pytest.importorskip("torch")
    m = create_model("mcunet_in2", redistribute_rf=True, **TINY)
    x = jax.random.normal(jax.random.key(5), (2, 40, 40, 3))
    v = _perturbed(m, x)
    scaled = [(e, make_divisible(c * 0.25), k, s) for e, c, k, s in mcunet_blocks(m)]
    ref = _torch_mcunet(torch, 8, scaled, 10)

    def load_conv_bn(seq, p, s):
        seq[0].weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        seq[1].weight.data = torch.from_numpy(np.asarray(p["scale"]))
        seq[1].bias.data = torch.from_numpy(np.asarray(p["bias"]))
        seq[1].running_mean.data = torch.from_numpy(np.asarray(s["mean"]))
        seq[1].running_var.data = torch.from_numpy(np.asarray(s["var"]))

    params, stats = v["params"], v["batch_stats"]
    load_conv_bn(ref.first_conv, params["first_conv"], stats["first_conv"])
    for i, block in enumerate(ref.blocks):
        for part in ("inverted_bottleneck", "depth_conv", "point_linear"):
            if getattr(block, part) is not None:
                name = f"blocks_{i}"
                load_conv_bn(getattr(block, part), params[name][part], stats[name][part])
    ref.classifier.weight.data = torch.from_numpy(
        np.asarray(params["classifier"]["kernel"]).T.copy()
    )
    ref.classifier.bias.data = torch.from_numpy(np.asarray(params["classifier"]["bias"]))
    got = jax.jit(lambda v, x: m.apply(v, x, train=False), compiler_options=FAST_COMPILE)(v, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    assert float(np.std(want)) > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
