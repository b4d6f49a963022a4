"""The kernel toolkit itself: dispatch rules, the interpret switch, the lowering helper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels import (
    Implementation,
    UnsupportedImplementationError,
    gpu_interpret,
    interpret,
    interpret_enabled,
    select_implementation,
    tpu_interpret,
)
from jaxblocks.kernels.lowering import LoweringError, check_lowering
from tests.kernels.harness import assert_close, check_forward_and_vjp, rel_rms


def _double_gpu(x):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=gpu_interpret(),
        name="double_gpu",
    )(x)


def _double_tpu(x):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(),
        interpret=tpu_interpret(),
        name="double_tpu",
    )(x)


def _even(x):
    return None if x.shape[-1] % 2 == 0 else f"last dim {x.shape[-1]} is odd"


IMPLS = {
    "reference": Implementation(lambda x: x * 2),
    "xla": Implementation(lambda x: x + x, supports=_even),
    "pallas_gpu": Implementation(_double_gpu, supports=_even),
    "pallas_tpu": Implementation(_double_tpu),
}


def test_auto_picks_xla_on_cpu_and_falls_back_on_shape():
    x = jnp.ones((4, 8))
    assert select_implementation("double", None, IMPLS, x)[0] == "xla"
    y = jnp.ones((4, 7))
    assert select_implementation("double", None, IMPLS, y)[0] == "reference"


def test_unknown_and_unsupported_names_raise_listing_choices():
    x = jnp.ones((4, 7))
    with pytest.raises(UnsupportedImplementationError, match="available:.*'xla'"):
        select_implementation("double", "cuda_magic", IMPLS, x)
    with pytest.raises(UnsupportedImplementationError, match="last dim 7 is odd"):
        select_implementation("double", "pallas_gpu", IMPLS, x)


def test_interpret_switch_runs_both_kernel_styles_on_cpu():
    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
    assert not interpret_enabled()
    with interpret():
        assert interpret_enabled()
        np.testing.assert_array_equal(_double_gpu(x), 2 * x)
        np.testing.assert_array_equal(_double_tpu(x), 2 * x)
    assert not interpret_enabled()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_finds_the_kernel(platform):
    fn = _double_gpu if platform == "cuda" else _double_tpu
    x = jnp.ones((8, 128), jnp.float32)
    text = check_lowering(fn, [x], platform, op="double")
    assert "double" in text


def test_lowering_reports_missing_kernel():
    with pytest.raises(LoweringError, match="plain_xla.*holds 0 Pallas kernel"):
        check_lowering(lambda x: x * 2, [jnp.ones((8, 128))], "tpu", op="plain_xla")


def test_harness_metric_and_failure():
    b = jnp.array([1.0, 2.0, 3.0])
    assert rel_rms(b, b) == 0.0
    assert rel_rms(b * 1.1, b) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(AssertionError, match="rel_rms"):
        assert_close(b * 1.1, b)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(b.at[0].set(jnp.nan), b)


def test_harness_catches_a_wrong_gradient():
    @jax.custom_vjp
    def bad_square(x):
        return x * x

    bad_square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # missing the factor 2
    x = jax.random.normal(jax.random.key(0), (16,))
    check_forward_and_vjp(lambda x: x * x, functools.partial(jnp.square), [x])
    with pytest.raises(AssertionError, match="grad"):
        check_forward_and_vjp(bad_square, jnp.square, [x])


def test_resource_estimates_and_limits():
    from jaxblocks.kernels.resources import H100, TPU_V5E, GpuWorkingSet, TpuWorkingSet, nbytes

    assert nbytes((128, 64), "float32") == 32768 and nbytes((3, 5), "bfloat16") == 30
    # A [128, 128] fp32 block over 4 warps: 16384 / 128 = 128 registers + overhead: fits.
    small = GpuWorkingSet("k", live_bytes=nbytes((128, 128), "float32"), num_warps=4)
    assert small.registers_per_thread == 128 + 32 and small.check() is None
    big = GpuWorkingSet("k", live_bytes=2 * nbytes((128, 128), "float32"), num_warps=4)
    assert "registers per thread" in big.check(H100) and big.check(H100).startswith("k:")
    # 16 warps at ~160 registers a thread: each thread fits, the SM's 64K register file does not
    wide = GpuWorkingSet("k", live_bytes=4 * nbytes((128, 128), "float32"), num_warps=16)
    assert wide.registers_per_thread == 160
    assert "x 512 threads exceed the 65536 registers" in wide.check(H100)
    assert (
        GpuWorkingSet("k", live_bytes=2 * nbytes((128, 128), "float32"), num_warps=8).check()
        is None
    )
    smem = GpuWorkingSet("k", live_bytes=0, num_warps=4, shared_memory_bytes=300 * 1024)
    assert "shared memory" in smem.check()
    tpu = TpuWorkingSet("t", block_bytes=5 * 2**20, scratch_bytes=2**20)
    assert tpu.vmem_bytes == 11 * 2**20 and tpu.check() is None
    assert "VMEM" in TpuWorkingSet("t", block_bytes=9 * 2**20).check(TPU_V5E)


def test_precision_names():
    from jax import lax

    from jaxblocks.kernels.precision import resolve_precision

    assert resolve_precision("op", "highest") == lax.Precision.HIGHEST
    assert resolve_precision("op", "tf32") == lax.Precision.DEFAULT
    for bad in ("fp32", None, lax.Precision.HIGHEST):
        with pytest.raises(ValueError, match=r"op: precision must be one of"):
            resolve_precision("op", bad)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [(None, "tf32"), (jax.lax.Precision.DEFAULT, "tf32"), (jax.lax.Precision.HIGHEST, "ieee")],
)
def test_triton_dot_precisions_reads_the_lowered_kernel(precision, expected):
    """The Triton IR inside an exported cuda module says how each fp32 dot multiplies."""
    from jax.experimental import pallas as pl

    from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions, triton_modules

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...], b_ref[...], precision=precision)

    def f(a, b):
        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((32, 32), jnp.float32), name="dot32"
        )(a, b)

    x = jnp.ones((32, 32), jnp.float32)
    text = export_mlir(f, (x, x), "cuda")
    assert len(triton_modules(text)) == 1
    assert triton_dot_precisions(text) == [expected]
