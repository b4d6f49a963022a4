"""pointwise_conv_bn: every implementation against the fp32 reference, forward and VJP."""

from __future__ import annotations

import ast
import contextlib
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import UnsupportedImplementationError, interpret
from jaxblocks.kernels.conv_bn import _common, api, pallas_gpu, pallas_tpu, specs
from jaxblocks.kernels.conv_bn.api import BlockSizes, pointwise_conv_bn
from jaxblocks.kernels.conv_bn.reference import ACTIVATIONS, pointwise_conv_bn_reference
from jaxblocks.kernels.conv_bn.xla import activate, activation_grad, residual_kind
from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions
from jaxblocks.kernels.resources import H100, TPU_V5E
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
)

IMPLS = [name for name in api.IMPLEMENTATIONS if name != "reference"]
PALLAS = [name for name in IMPLS if name.startswith("pallas")]


def _mode(impl):
    return interpret() if impl.startswith("pallas") else contextlib.nullcontext()


def _op(impl, activation, epsilon=1e-5, block_sizes=None):
    # jit: one trace per test instead of eager op-by-op dispatch (the TPU interpreter is ~4x
    # faster this way). Traced inside `interpret()`, so the Pallas kernels run interpreted.
    @jax.jit
    def f(x, w, scale, bias, mean, var, conv_bias=None):
        return pointwise_conv_bn(
            x,
            w,
            scale,
            bias,
            mean,
            var,
            conv_bias=conv_bias,
            epsilon=epsilon,
            activation=activation,
            implementation=impl,
            block_sizes=block_sizes,
        )

    return f


def _ref(activation, epsilon=1e-5):
    return jax.jit(
        functools.partial(pointwise_conv_bn_reference, epsilon=epsilon, activation=activation)
    )


# fp32: every implementation (xla, and both kernels interpreted) is within rel-RMS 2.8e-7 of the
# fp32 reference on the TEST_CASES, forward and every gradient (measured; summation order is all
# that differs); 10x that.
FP32_TOL = 3e-6


def _tol(case):
    """fp32: `FP32_TOL`. bf16: the harness's 2e-2; measured at most 9.8e-3 (dscale, silu with
    a folded scale of ~100): one bf16 rounding of x, of w' and of dz, each ~2e-3 relative,
    accumulated in fp32."""
    return FP32_TOL if case.dtype == "float32" else None


def _grad_tol(case):
    """bf16 with a kinked activation: where |pre| is within bf16 rounding of the kink the mask
    flips against the fp32 reference and moves a whole cotangent entry; those flips alone give
    rel-RMS up to 7.8e-2 on dw (7.2e-2 dbias, 6.3e-2 dscale; measured, identical for xla and
    both kernels, so it is the data, not an implementation). 1e-1 keeps ~25 % headroom; a
    wrong mask (e.g. from the pre-activation sign flipped) gives O(1). Elsewhere `_tol`."""
    if case.dtype == "bfloat16" and case.activation in ("relu", "relu6"):
        return 1e-1
    return _tol(case)


def _args(case):
    args = case.make()
    return list(args) if args[-1] is not None else list(args[:-1])


@pytest.mark.parametrize("case", specs.TEST_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_and_vjp_vs_reference(impl, case):
    args = _args(case)
    with _mode(impl):
        check_forward_and_vjp(
            _op(impl, case.activation),
            _ref(case.activation),
            args,
            dtype=jnp.dtype(case.dtype),
            tol=_tol(case),
            grad_tol=_grad_tol(case),
        )


# Small tiles so every grid axis and every in-kernel loop takes several steps (the cases above fit
# one block), including padding of M, C_in and C_out and, on GPU, a split dw' reduction.
MULTI_BLOCK = {
    "pallas_gpu": (
        pallas_gpu.pointwise_conv_bn_pallas_gpu,
        BlockSizes(block_m=16, block_n=16, block_k=16, dw_splits=2),
        specs.Case("multi", (37, 40), 40, "float32", "silu", conv_bias=True),
    ),
    "pallas_tpu": (
        pallas_tpu.pointwise_conv_bn_pallas_tpu,
        BlockSizes(block_m=16, block_n=128, block_k=128),
        specs.Case("multi", (37, 200), 136, "float32", "silu", conv_bias=True),
    ),
}


@pytest.mark.parametrize("impl", PALLAS)
def test_multi_block_grids(impl):
    fn, blocks, case = MULTI_BLOCK[impl]
    op = jax.jit(functools.partial(fn, activation=case.activation, block_sizes=blocks))
    with interpret():
        check_forward_and_vjp(op, _ref(case.activation), _args(case), tol=FP32_TOL)


# One `BlockSizes` serves both backends: values neither backend takes fail on construction, values
# only the other backend takes fail when the backend is asked for (its `supports` names them).
@pytest.mark.parametrize(
    "impl, kwargs, match",
    [
        ("pallas_gpu", dict(block_m=48), r"block_m must be a power of two >= 16"),
        ("pallas_gpu", dict(block_k=8), r"block_k must be a power of two >= 16"),
        ("pallas_gpu", dict(num_warps=0), r"num_warps must be a positive"),
        ("pallas_gpu", dict(dw_splits=0), r"dw_splits must be None or >= 1"),
        ("pallas_tpu", dict(block_n=64), r"block_n must be a positive multiple of 128"),
        ("pallas_tpu", dict(block_m=20), r"block_m must be a positive multiple of 16"),
    ],
)
def test_block_sizes_are_validated(impl, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(implementation=impl, block_sizes=BlockSizes(**kwargs))


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_vjp_matches_autodiff_of_reference(impl):
    case = specs.Case("cvjp", (3, 11, 24), 40, "float32", "silu", conv_bias=True)
    with _mode(impl):
        check_custom_vjp_matches_autodiff(
            _op(impl, case.activation), _ref(case.activation), _args(case), tol=FP32_TOL
        )


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_helpers_match_jax_nn(activation):
    pre = jnp.linspace(-8.0, 8.0, 1001)
    want = ACTIVATIONS[activation](pre)
    np.testing.assert_allclose(activate(pre, activation), want, rtol=1e-5, atol=1e-5)
    d_want = jax.vmap(jax.grad(ACTIVATIONS[activation]))(pre)
    kind = residual_kind(activation)
    res = pre if kind in (None, "pre") else want
    # Away from the kinks (0 and 6) the derivative from the residual is exact.
    keep = (jnp.abs(pre) > 1e-3) & (jnp.abs(pre - 6.0) > 1e-3)
    np.testing.assert_allclose(
        activation_grad(res, activation)[keep], d_want[keep], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_x_stays_in_its_row(impl):
    case = specs.Case("nan", (2, 5, 7, 24), 40, "float32", "relu", conv_bias=True)
    x, *rest = _args(case)
    x = x.at[1, 3, 2, 5].set(jnp.nan)
    with _mode(impl):
        y = _op(impl, case.activation)(x, *rest)
    bad = np.isnan(np.asarray(y)).any(axis=-1)
    want = np.zeros(x.shape[:-1], bool)
    want[1, 3, 2] = True
    np.testing.assert_array_equal(bad, want)
    assert np.isnan(np.asarray(y)[1, 3, 2]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_input_gives_empty_output_and_zero_grads(impl):
    case = specs.Case("empty", (0, 7, 24), 40, "float32", "silu", conv_bias=True)
    args = _args(case)
    f = _op(impl, case.activation)
    with _mode(impl):
        y = f(*args)
        grads = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=tuple(range(len(args))))(*args)
    assert y.shape == (0, 7, 40) and y.dtype == jnp.float32
    assert grads[0].shape == (0, 7, 24)
    for g, a in zip(grads[1:], args[1:], strict=True):
        assert g.shape == a.shape
        np.testing.assert_array_equal(g, 0.0)


def test_automatic_dispatch_on_cpu_uses_xla_and_matches_reference():
    case = specs.TEST_CASES[0]
    args = _args(case)
    y = _op(None, case.activation)(*args)
    want = _ref(case.activation)(*args)
    assert_close(y, want)


def test_output_dtype_follows_x():
    case = specs.Case("dt", (4, 24), 40, "bfloat16", "relu")
    args = _args(case)
    args[1] = args[1].astype(jnp.float32)  # an fp32 weight with a bf16 input: fold in fp32
    assert _op("xla", "relu")(*args).dtype == jnp.bfloat16


@pytest.mark.parametrize("case", specs.LOWERING_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl, platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_lowering_value_and_grad(impl, platform, case):
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _args(case)]
    op = _op(impl, case.activation)
    loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
    # Three kernels: the forward, dx and dw' (the backward ones only exist if the VJP is lowered).
    text = check_pallas_lowering(
        loss, args, platform, op=f"pointwise_conv_bn[{impl}]", min_kernels=3
    )
    for name in ("pointwise_conv_bn_fwd", "pointwise_conv_bn_bwd_dx", "pointwise_conv_bn_bwd_dw"):
        assert name in text


def _bad_call(**overrides):
    case = specs.Case("bad", (4, 6, 24), 40)
    x, w, scale, bias, mean, var, _ = case.make()
    kw = dict(x=x, w=w, scale=scale, bias=bias, mean=mean, var=var)
    kw.update(overrides)
    opts = {
        k: kw.pop(k)
        for k in (
            "conv_bias",
            "epsilon",
            "activation",
            "implementation",
            "block_sizes",
            "precision",
        )
        if k in kw
    }
    return pointwise_conv_bn(
        kw["x"], kw["w"], kw["scale"], kw["bias"], kw["mean"], kw["var"], **opts
    )


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(w=jnp.ones((24, 40, 1))), ValueError, r"w must have rank 2"),
        (dict(w=jnp.ones((23, 40))), ValueError, r"C_in\) must equal w.shape\[0\]=23"),
        (dict(x=jnp.ones((4, 24), jnp.int32)), TypeError, r"x must have dtype"),
        (dict(scale=jnp.ones((39,))), ValueError, r"scale must have shape \(40,\)"),
        (dict(var=jnp.ones((40, 1))), ValueError, r"var must have shape \(40,\)"),
        (dict(mean=None), TypeError, r"mean is required"),
        (dict(conv_bias=jnp.ones((41,))), ValueError, r"conv_bias must have shape \(40,\)"),
        (dict(activation="tanh"), ValueError, r"activation must be one of"),
        (dict(epsilon=-1.0), ValueError, r"epsilon must be a positive finite"),
        (dict(epsilon=jnp.float32(1e-5)), ValueError, r"epsilon must be a positive finite"),
        (dict(epsilon=0.0), ValueError, r"epsilon must be a positive finite"),
        (dict(implementation="cuda"), UnsupportedImplementationError, r"available:.*'xla'"),
        (dict(precision="fp32"), ValueError, r"pointwise_conv_bn: precision must be one of"),
        (dict(precision=jax.lax.Precision.HIGHEST), ValueError, r"precision must be one of"),
        (dict(w=jnp.ones((24, 0))), ValueError, r"w must not be empty"),
        (
            dict(block_sizes="x"),
            TypeError,
            r"block_sizes must be None or a jaxblocks\.kernels\.conv_bn\.BlockSizes, got str",
        ),
        (
            dict(block_sizes=dict(block_m=16)),
            TypeError,
            r"block_sizes must be None or a .*BlockSizes, got dict",
        ),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


# --- block_sizes through the public function ------------------------------------------------


def _pallas_grids(jaxpr) -> dict[str, tuple[int, ...]]:
    """{kernel name: grid} of every pallas_call in ``jaxpr`` and its sub-jaxprs."""
    grids = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            grids[eqn.params["name"]] = tuple(eqn.params["grid_mapping"].grid)
        for p in eqn.params.values():
            sub = getattr(p, "jaxpr", p)
            if hasattr(sub, "eqns"):
                grids.update(_pallas_grids(sub))
    return grids


# Non-default block sizes and the grids they give (the defaults give one block per axis here):
# GPU M=37 -> 3 row tiles of 16 (forward), 64 rows in 2 dw' splits of 2 tiles (backward);
# TPU C_in=200 -> 2 tiles of 128, C_out=136 -> 2 tiles of 128, M=37 -> 3 tiles of 16.
PUBLIC_BLOCKS = {
    "pallas_gpu": (
        BlockSizes(block_m=16, block_n=16, block_k=16, num_warps=2, num_stages=2, dw_splits=2),
        specs.Case("pub", (37, 40), 40, "float32", "gelu", conv_bias=True),
        {
            "pointwise_conv_bn_fwd": (3, 3),
            "pointwise_conv_bn_bwd_dx": (4, 3),
            "pointwise_conv_bn_bwd_dw": (2, 3, 3),
        },
    ),
    "pallas_tpu": (
        BlockSizes(block_m=16, block_n=128, block_k=128),
        specs.Case("pub", (37, 200), 136, "bfloat16", "relu6", conv_bias=True),
        {
            "pointwise_conv_bn_fwd": (3, 2, 2),
            "pointwise_conv_bn_bwd_dx": (3, 2, 2),
            "pointwise_conv_bn_bwd_dw": (2, 2, 3),
        },
    ),
}


@pytest.mark.parametrize("impl", PALLAS)
def test_block_sizes_pass_through_public_function(impl):
    blocks, case, want_grids = PUBLIC_BLOCKS[impl]
    args = _args(case)
    op = _op(impl, case.activation, block_sizes=blocks)
    with interpret():
        check_forward_and_vjp(
            op,
            _ref(case.activation),
            args,
            dtype=jnp.dtype(case.dtype),
            tol=_tol(case),
            grad_tol=_grad_tol(case),
        )
        loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args).jaxpr
    assert _pallas_grids(jaxpr) == want_grids


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_m", 0),
        ("block_m", 24),
        ("block_m", 16.0),
        ("block_n", 48),
        ("block_k", True),
        ("block_k", 8),
        ("num_warps", 0),
        ("num_stages", 2.5),
        ("dw_splits", -1),
    ],
)
def test_invalid_block_sizes_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes\.{field} must .*got {value!r}"):
        BlockSizes(**{field: value})


@pytest.mark.parametrize(
    "impl, blocks, x_dtype, reason",
    [
        ("pallas_gpu", BlockSizes(block_n=384), "float32", r"block_n must be a power of two"),
        ("pallas_tpu", BlockSizes(block_k=32), "float32", r"block_k must be a positive multiple"),
        ("pallas_tpu", None, "float16", r"x dtype float16 is not one of float32, bfloat16"),
    ],
)
def test_unsupported_inputs_raise_with_the_reason(impl, blocks, x_dtype, reason):
    x = jnp.ones((4, 6, 24), x_dtype)
    with pytest.raises(UnsupportedImplementationError, match=rf"{impl}.*{reason}"):
        _bad_call(x=x, implementation=impl, block_sizes=blocks)
    # The predicate itself, on the [M, C_in] rows the op dispatches on.
    args = specs.Case("s", (24, 24), 40).make()
    rows = (x.reshape(-1, 24), *args[1:])
    assert api.IMPLEMENTATIONS[impl].supports(*rows, block_sizes=blocks) is not None


def test_supports_accepts_tested_and_benchmarked_cases_with_default_blocks():
    cases = specs.TEST_CASES + specs.LOWERING_CASES + specs.BENCHMARK_CASES
    cases += specs.QUICK_BENCHMARK_CASES
    for case in cases:
        x, *rest = jax.eval_shape(case.make)  # shapes only: no benchmark-sized arrays
        rows = jax.ShapeDtypeStruct((case.m, case.c_in), x.dtype)
        for impl in PALLAS:
            assert api.IMPLEMENTATIONS[impl].supports(rows, *rest) is None, (impl, case.name)


def test_automatic_dispatch_ignores_block_sizes_off_accelerators():
    case = specs.TEST_CASES[0]
    args = _args(case)
    f = lambda *a: pointwise_conv_bn(
        *a[:6], conv_bias=a[6], activation=case.activation, block_sizes=BlockSizes(block_n=384)
    )
    assert_close(jax.jit(f)(*args), _ref(case.activation)(*args))


def test_pallas_calls_use_the_shared_cost_model():
    # The three kernels' estimates add up to the op's forward + backward formulas (specs re-exports
    # them from _common for the benchmark).
    m, k, n, item = 96, 48, 80, 2
    fwd = _common.cost_estimate("fwd", m, k, n, item, "relu")
    dx = _common.cost_estimate("dx", m, k, n, item, "relu", has_res=True)
    dw = _common.cost_estimate("dw", m, k, n, item, "relu", has_res=True)
    assert fwd.flops == specs.forward_flops(m, k, n) == 2 * m * k * n
    assert dx.flops + dw.flops == specs.backward_flops(m, k, n)
    assert fwd.bytes_accessed == specs.forward_bytes(m, k, n, item)
    assert dx.bytes_accessed + dw.bytes_accessed == specs.backward_bytes(m, k, n, item)
    assert _common.cost_estimate("fwd", m, k, n, item, "silu").transcendentals == m * n
    assert fwd.transcendentals == 0


# --- structure: the backends share one core -------------------------------------------------


def _function_bodies(path: pathlib.Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {
        node.name: ast.dump(ast.Module(body=node.body, type_ignores=[]))
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 3
    }


def test_backends_share_no_function_body_and_import_only_common():
    folder = pathlib.Path(api.__file__).parent
    gpu = _function_bodies(folder / "pallas_gpu.py")
    tpu = _function_bodies(folder / "pallas_tpu.py")
    repeated = sorted(
        (g, t) for g, body in gpu.items() for t, other in tpu.items() if body == other
    )
    assert not repeated, f"function bodies repeated in pallas_gpu.py and pallas_tpu.py: {repeated}"
    for name in ("pallas_gpu.py", "pallas_tpu.py"):
        tree = ast.parse((folder / name).read_text())
        own = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("jaxblocks.kernels.conv_bn")
        }
        assert own == {"jaxblocks.kernels.conv_bn._common"}, (name, own)


# --- precision: stated and controlled ----------------------------------------------------------


@pytest.mark.parametrize("precision, want", [("highest", "ieee"), ("tf32", "tf32")])
def test_pallas_gpu_fp32_dots_follow_precision(precision, want):
    """The three kernels' dots (forward, dx, dw') at fp32: IEEE fp32 by default, TF32 only when
    asked (Triton's own default for a Pallas dot would be TF32)."""
    case = specs.Case("prec", (37, 24), 40, "float32", "silu", conv_bias=True)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _args(case)]

    def loss(x, w, scale, bias, mean, var, conv_bias):
        y = pointwise_conv_bn(
            *(x, w, scale, bias, mean, var),
            conv_bias=conv_bias,
            activation="silu",
            implementation="pallas_gpu",
            precision=precision,
        )
        return jnp.sum(y)

    text = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 2)), args, "cuda")
    assert triton_dot_precisions(text) == [want] * 3


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("precision, want", [("highest", "HIGHEST"), ("tf32", "DEFAULT")])
def test_xla_and_reference_products_follow_precision(impl, precision, want):
    case = specs.Case("prec", (37, 24), 40, "float32", "relu")
    args = _args(case)
    f = lambda *a: jnp.sum(
        pointwise_conv_bn(*a, activation="relu", implementation=impl, precision=precision)
    )
    text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args))
    assert set(re.findall(r"precision=\(?Precision\.(\w+)", text)) == {want}


# --- resource budgets ---------------------------------------------------------------------------


def test_default_blocks_fit_at_documented_shapes():
    cases = specs.LOWERING_CASES + specs.BENCHMARK_CASES + specs.QUICK_BENCHMARK_CASES
    for case in cases:
        for dtype in ("float32", "bfloat16"):  # silu saves the pre-activation too
            for activation in (case.activation, "silu"):
                for impl, limits in (("pallas_gpu", H100), ("pallas_tpu", TPU_V5E)):
                    sets = _common.working_set(
                        impl, case.m, case.c_in, case.c_out, dtype, activation
                    )
                    assert [s.kernel for s in sets] == list(_common.KERNELS)
                    for s in sets:
                        assert s.check(limits) is None, (case.name, dtype, impl, s.check(limits))


def test_working_set_by_hand():
    # GPU dx at the defaults (64, 64, 32), fp32 with a residual, 3 stages: per stage dy and res
    # [64, 64] fp32, w [32, 64] fp32 and s [64]; once: dz [64, 64] and w' [32, 64] for the dot.
    _, dx, _ = _common.working_set("pallas_gpu", 5000, 1024, 256, "float32", "relu")
    per_stage = 2 * 64 * 64 * 4 + 32 * 64 * 4 + 64 * 4
    assert dx.shared_memory_bytes == 3 * per_stage + (64 + 32) * 64 * 4 == 148224
    # registers: acc [64, 32], dy/res/dz32/dz [64, 64], w/w' [32, 64], fp32, over 128 threads.
    assert dx.registers_per_thread == (64 * 32 + 4 * 64 * 64 + 2 * 32 * 64) // 128 + 32 == 208
    # TPU forward, x [1568, 1024] fp32 -> 256, silu: tiles (256, 256, 512); x, w, s and b'
    # (each an (8, 256) tile), y and pre, double-buffered, + the [256, 256] fp32 accumulator.
    fwd, _, _ = _common.working_set("pallas_tpu", 1568, 1024, 256, "float32", "silu")
    blocks = 256 * 512 * 4 + 512 * 256 * 4 + 2 * 8 * 256 * 4 + 2 * 256 * 256 * 4
    assert fwd.vmem_bytes == 2 * blocks + 256 * 256 * 4 == 3440640


@pytest.mark.parametrize(
    "impl, blocks, shape, match",
    [
        # 6 pipeline stages of fp32 dy, residual and w tiles: ~265 KB of shared memory.
        (
            "pallas_gpu",
            BlockSizes(num_stages=6),
            (256, 64, 64),
            r"pointwise_conv_bn_bwd_dx: ~\d+ KB of shared memory exceed the 227 KB",
        ),
        # The old untuned defaults: a [128, 128] fp32 accumulator plus the step's tiles.
        (
            "pallas_gpu",
            BlockSizes(block_m=128, block_n=128, block_k=64),
            (256, 128, 128),
            r"pointwise_conv_bn_fwd: ~352 registers per thread at num_warps=4",
        ),
        (
            "pallas_tpu",
            BlockSizes(block_m=2048, block_n=1024, block_k=1024),
            (2048, 1024, 1024),
            r"pointwise_conv_bn_fwd: ~.* MiB of VMEM per grid step exceed the 16 MiB",
        ),
    ],
)
def test_configuration_that_cannot_fit_is_rejected(impl, blocks, shape, match):
    m, c_in, c_out = shape
    f32 = jnp.float32
    args = [jax.ShapeDtypeStruct((m, c_in), f32), jax.ShapeDtypeStruct((c_in, c_out), f32)]
    args += [jax.ShapeDtypeStruct((c_out,), f32)] * 4
    f = lambda *a: pointwise_conv_bn(*a, activation="relu", implementation=impl, block_sizes=blocks)
    with pytest.raises(UnsupportedImplementationError, match=rf"{impl}.*{match}"):
        jax.eval_shape(f, *args)
