"""MCUNetV2 patch-based inference: equal to full-image inference (strides 1 and 2, odd sizes,
shortcut branches), geometry against hand composition, and clear errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.analysis.patch_inference import (
    StageGeometry,
    conv_geometry,
    halo_overhead,
    patch_apply,
    patch_slices,
    patch_stage,
    stage_apply,
    trace_geometry,
)
from jaxblocks.registry import create_model

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def mobilenet():
    m = create_model("mobilenet_v2", num_classes=10, width_multiplier=0.25)
    x = jax.random.normal(jax.random.key(0), (2, 41, 37, 3))  # odd, non-square
    return m, _perturbed(m, x), x


def _perturbed(model, x):
    """Random variables with non-trivial BN affine and statistics, from the shapes only."""
    abstract = nn.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), x))
    rng = np.random.default_rng(7)

    def draw(path, leaf):
        name, shape = str(path[-1]), leaf.shape
        if "kernel" in name:  # He-style scale keeps activations O(1) through the stage
            return rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / np.prod(shape[:-1]))
        if "var" in name:
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if "scale" in name:
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _apply_fn(model, **kw):
    return jit(lambda v, x: patch_apply(model, v, x, **kw, train=False))


def test_conv_geometry_by_hand():
    # stem 3x3/2 p1, then 3x3/1 p1 at stride 2, then 3x3/2 p1 at stride 2, then 3x3/1 at 4
    g = conv_geometry([(3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)])
    assert g == StageGeometry((4, 4), (1 + 2 + 2 + 4,) * 2, (9, 9))
    assert conv_geometry([((1, 5), 1, ((0, 0), (2, 2)))]) == StageGeometry((1, 1), (0, 2), (0, 2))
    assert conv_geometry([(3, 1, "SAME"), (2, 2, "VALID")]) == StageGeometry((2, 2), (1, 1), (2, 2))


def test_traced_geometry_of_mobilenet_matches_its_layers(mobilenet):
    m, v, _ = mobilenet
    probe = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    got = trace_geometry(m, v, probe, until="features_3", train=False)
    # features_0: 3x3/2; features_1: dw 3x3/1; features_2: dw 3x3/2; features_3: dw 3x3/1
    assert got == conv_geometry([(3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)])


def test_patch_inference_equals_full_image(mobilenet):
    m, v, x = mobilenet
    stitched = jit(
        lambda v, x: patch_stage(m, v, x, until="features_3", patches=(3, 2), train=False)
    )
    want = jit(lambda v, x: stage_apply(m, v, x, until="features_3", train=False))(v, x)
    assert want.shape == (2, 11, 10, 8) and float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(stitched(v, x), want, rtol=1e-5, atol=1e-5)
    # the check could not pass by accident: an under-estimated reach changes the outputs
    small = StageGeometry((4, 4), (1, 1), (1, 1))
    bad = jit(
        lambda v, x: patch_stage(
            m, v, x, until="features_3", patches=3, geometry=small, train=False
        )  # fmt: skip
    )(v, x)
    assert float(jnp.max(jnp.abs(bad - want))) > 1e-2


def test_stride_one_stem_and_shortcut_branches():
    # ResNet-18 with the small (3x3 stride-1) stem: layer2_0 has a strided 1x1 shortcut
    m = create_model("resnet18", num_classes=5, width=8, stem="small")
    x = jax.random.normal(jax.random.key(2), (1, 23, 30, 3))
    v = _perturbed(m, x)
    want = jit(lambda v, x: m.apply(v, x, train=False))(v, x)
    assert float(jnp.std(want)) > 0.1
    assert float(jnp.max(jnp.abs(m.apply(v, x + 1.0, train=False) - want))) > 0.1  # input matters
    got = _apply_fn(m, until="layer2_0", patches=(3, 2))(v, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_patch_slices_cover_and_align():
    sl = patch_slices(41, 11, 3, stride=4, left=9, right=9)
    assert [o for _, o in sl] == [(0, 4), (4, 7), (7, 11)]
    for (a, b), (o0, o1) in sl:
        assert a % 4 == 0 and a <= max(0, 4 * o0 - 9) and b >= min(41, 4 * (o1 - 1) + 10)
    with pytest.raises(ValueError, match="12 patches for 11 output pixels"):
        patch_slices(41, 11, 12, 4, 9, 9)


def test_halo_overhead_grows_with_patches_and_reach():
    g = conv_geometry([(3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)])
    g_big = conv_geometry([(3, 2, 1), (7, 1, 3), (3, 2, 1), (7, 1, 3)])
    assert halo_overhead((224, 224), (56, 56), (1, 1), g) == 1.0
    o2, o4 = (halo_overhead((224, 224), (56, 56), (n, n), g) for n in (2, 4))
    assert 1.0 < o2 < o4
    # receptive-field redistribution: smaller kernels in the patch stage cut the overhead
    assert halo_overhead((224, 224), (56, 56), (4, 4), g_big) > o4


def test_errors(mobilenet):
    m, v, x = mobilenet
    with pytest.raises(ValueError, match="x must be NHWC"):
        patch_apply(m, v, x[0], until="features_3", train=False)
    with pytest.raises(ValueError, match="until='nope' is not"):
        patch_apply(m, v, x, until="nope", train=False)
    with pytest.raises(ValueError, match="depends on the input size"):
        conv_geometry([(3, 2, "SAME")])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        StageGeometry((0, 1), (0, 0), (0, 0))
