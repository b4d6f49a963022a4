"""flashrnn: every implementation vs the fp32 reference (forward and all gradients), the hand
derived cell backward vs autodiff, sLSTM's stabilizer, lowering for cuda/tpu, the precision of
every product, the kernels' resource estimates, errors, edge cases.

Shapes sample T ∈ {1, 3, 7, 17, 64, 257}, D ∈ {16, 32, 48, 64}, N ∈ {1, 2, 4}, B odd and even;
long sequences run on ``xla`` only, the interpreted Pallas kernels on short ones.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import (
    UnsupportedImplementationError,
    dispatch,
    interpret,
    select_implementation,
)
from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions
from jaxblocks.kernels.resources import H100, TPU_V5E
from jaxblocks.kernels.rnn import _common, api, pallas_tpu
from jaxblocks.kernels.rnn.api import CELLS, BlockSizes, flashrnn, flashrnn_step
from jaxblocks.kernels.rnn.cells import pointwise, pointwise_bwd
from jaxblocks.kernels.rnn.specs import BENCHMARK_CASES, LOWERING_CASES, Case, make_inputs
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
)

F32, BF16 = jnp.float32, jnp.bfloat16

# (forward, gradient) relative-RMS tolerances vs the fp32 reference, at what the implementations
# achieve. fp32, measured in interpret mode on CPU over the fp32 cases of this file (forward /
# worst gradient over Wx, R, b, states; all four cells): pallas_gpu 1.0e-7 / 3.1e-7, pallas_tpu
# 1.0e-7 / 2.8e-7, xla 1.3e-7 / 5.6e-7 (T up to 257). The tolerances are ~6-10x those maxima.
# bf16: Wx, R, b, states are rounded to bf16 (relative 2^-9) and the states are stored in bf16
# after every step, so the forward is about one bf16 rounding off (measured ≤ 1.8e-3); dWx is
# stored in bf16 and dR, db sum B·T rounded terms (measured ≤ 3.9e-3, growing slowly with T).
# 1e-2 / 2e-2 are ~5x those: a wrong gate or a lost tile is off by O(1).
TOLERANCES = {jnp.dtype(F32): (1.5e-6, 3.5e-6), jnp.dtype(BF16): (1e-2, 2e-2)}


def _check(fn, ref_fn, args, dtype):
    """`check_forward_and_vjp` at this op's measured tolerances for ``dtype``."""
    tol, grad_tol = TOLERANCES[jnp.dtype(dtype)]
    check_forward_and_vjp(fn, ref_fn, args, dtype=dtype, tol=tol, grad_tol=grad_tol)


def _impl(function, implementation):
    return lambda *a: flashrnn(*a, function=function, implementation=implementation)


def _ref(function):
    return _impl(function, "reference")


# --- the cell backward used by the kernels equals autodiff of the cell ----------------------


@pytest.mark.parametrize("function", list(CELLS))
def test_pointwise_bwd_matches_autodiff(function):
    cell = CELLS[function]
    ks = jax.random.split(jax.random.key(3), 5)
    shape = (6, 8)
    wx = list(2 * jax.random.normal(ks[0], (cell.G, *shape)))
    ry = list(2 * jax.random.normal(ks[1], (cell.Gr, *shape)))
    b = list(jax.random.normal(ks[2], (cell.Gb, *shape)))
    st = jax.random.normal(ks[3], (cell.S, *shape))
    if function == "slstm":  # half the rows start fresh (n = 0), half stabilised (n ≥ 1)
        st = st.at[2].set(jnp.where(jnp.arange(6)[:, None] < 3, 0.0, 1 + jnp.abs(st[2])))
    st = list(st)
    ct = list(jax.random.normal(ks[4], (cell.S, *shape)))
    _, vjp = jax.vjp(lambda *a: pointwise(function, *a), wx, ry, b, st)
    want = vjp(tuple(ct))
    got = pointwise_bwd(function, wx, ry, b, st, ct)
    for name, g, w in zip(("wx", "ry", "b", "states"), got, want, strict=True):
        assert_close(list(g), list(w), tol=1e-5, name=f"{function} d{name}")


def test_xla_lstm_one_tanh_gates_match_the_cell_with_saturated_gates():
    """`xla`'s LSTM step (all four gates from one tanh) against `cells.pointwise` and
    `pointwise_bwd`, with pre-activations up to ±40 so that every gate saturates somewhere."""
    from jaxblocks.kernels.rnn import xla

    D = 16
    ks = jax.random.split(jax.random.key(4), 4)
    pre = 12 * jax.random.normal(ks[0], (2, 5, 4 * D))
    st = list(jax.random.normal(ks[1], (2, 2, 5, D)))
    ct = list(jax.random.normal(ks[2], (2, 2, 5, D)))
    gates = [pre[..., g * D : (g + 1) * D] for g in range(4)]
    zeros = [0.0] * 4
    want = pointwise("lstm", gates, zeros, zeros, st)
    assert_close(list(xla._lstm_step(pre, st, D)), list(want), tol=1e-6, name="states")
    _, _, want_dpre, want_dst = pointwise_bwd("lstm", gates, zeros, zeros, st, ct)
    d_pre, d_st = xla._lstm_step_bwd(pre, st, ct, D)
    assert_close(d_pre, jnp.concatenate(want_dpre, axis=-1), tol=1e-6, name="d pre")
    assert_close(list(d_st), list(want_dst), tol=1e-6, name="d states")


# --- xla vs reference: long sequences, both dtypes --------------------------------------------

SLOW = pytest.mark.slow

XLA_CASES = [  # one case per cell in CI, the rest of the sample marked slow
    Case("lstm", 3, 257, 1, 48, F32),
    Case("slstm", 2, 64, 4, 16, BF16),
    Case("elman", 2, 1, 1, 64, BF16),
    pytest.param(Case("gru", 4, 3, 4, 32, F32), marks=SLOW),  # gru's xla forward: layer tests
    pytest.param(Case("lstm", 2, 64, 4, 32, BF16), marks=SLOW),
    pytest.param(Case("slstm", 3, 3, 1, 48, F32), marks=SLOW),
    pytest.param(Case("gru", 2, 257, 1, 16, BF16), marks=SLOW),
    pytest.param(Case("elman", 3, 64, 4, 48, F32), marks=SLOW),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=lambda c: c.name)
def test_xla_matches_reference(case):
    args = make_inputs(case)
    _check(_impl(case.function, "xla"), _ref(case.function), args, case.dtype)


@pytest.mark.parametrize("function", ["lstm", "gru"])
def test_xla_second_order_matches_reference(function):
    """The xla backward is a hand-written `custom_vjp`; it is itself differentiable, so a
    Hessian-vector product (reverse over reverse) matches the reference's autodiff."""
    wx, r, b, s = make_inputs(Case(function, 3, 9, 2, 16, F32), seed=5)
    vs = [jax.random.normal(jax.random.key(7 + i), x.shape) for i, x in enumerate((wx, r, b, s))]

    def hvp(implementation):
        def loss(*a):
            sa, last = flashrnn(*a, function=function, implementation=implementation)
            return jnp.sum(jnp.sin(sa)) + jnp.sum(last**2)

        def directional(*a):
            grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*a)
            return sum(jnp.vdot(g, v) for g, v in zip(grads, vs, strict=True))

        return jax.jit(jax.grad(directional, argnums=(0, 1, 2, 3)))(wx, r, b, s)

    # measured ≤ 3.4e-7 relative RMS over the four cells; ~10x that
    names = ("Wx", "R", "b", "states")
    for name, got, want in zip(names, hvp("xla"), hvp("reference"), strict=True):
        assert_close(got, want, tol=3e-6, name=f"{function} Hv[{name}]")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_xla_lowers_for_accelerators(platform):
    """xla serves GPUs and TPUs until their kernels are validated: its custom_vjp exports at the
    realistic bf16 shapes, one scan forward and one backward, dWx behind its layout barrier."""
    case = dataclasses.replace(LOWERING_CASES[0], function="gru")
    args = jax.eval_shape(lambda: make_inputs(case))
    module = export_mlir(_grad_fn("gru", "xla"), args, platform)
    assert module.count("stablehlo.while") == 2
    assert "optimization_barrier" in module


def test_forward_mode_runs_on_the_reference_only():
    """xla and the kernels are `custom_vjp`s (reverse mode, as torch's RNNs): `jax.jvp` needs
    ``implementation="reference"``, as flashrnn's docstring says."""
    wx, r, b, s = make_inputs(Case("elman", 2, 5, 1, 16, F32), seed=6)
    tangent = jax.random.normal(jax.random.key(8), wx.shape)

    def run(implementation):
        f = lambda x: flashrnn(x, r, b, s, function="elman", implementation=implementation)[1]
        return jax.jvp(f, (wx,), (tangent,))[1]

    eps = 1e-3  # the reference's jvp against a central difference
    f = lambda x: flashrnn(x, r, b, s, function="elman", implementation="reference")[1]
    fd = (f(wx + eps * tangent) - f(wx - eps * tangent)) / (2 * eps)
    assert_close(run("reference"), fd, tol=1e-3, name="jvp")
    with pytest.raises(TypeError, match="custom_vjp"):
        run("xla")


# --- Pallas kernels under the interpreters ----------------------------------------------------

GPU_CASES = [  # D=48 and B=3 exercise the wrapper's padding to power-of-two tiles
    Case("lstm", 3, 9, 2, 48, F32),
    Case("slstm", 2, 3, 1, 16, BF16),
    Case("gru", 2, 3, 4, 16, BF16),
    Case("elman", 1, 1, 1, 64, F32),
    pytest.param(Case("lstm", 2, 3, 1, 16, BF16), marks=SLOW),
    pytest.param(Case("slstm", 5, 7, 2, 32, F32), marks=SLOW),
    pytest.param(Case("gru", 1, 1, 1, 64, F32), marks=SLOW),
    pytest.param(Case("elman", 4, 17, 1, 16, BF16), marks=SLOW),
    pytest.param(Case("lstm", 3, 17, 2, 48, BF16), marks=SLOW),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_pallas_gpu_interpret_matches_reference(case):
    args = make_inputs(case, seed=1)
    with interpret():
        _check(_impl(case.function, "pallas_gpu"), _ref(case.function), args, case.dtype)


TPU_CASES = [  # (case, BlockSizes): several time blocks with T padding, several batch tiles
    (Case("lstm", 2, 7, 2, 16, BF16), BlockSizes(block_t=4)),
    (Case("slstm", 3, 3, 1, 48, F32), BlockSizes()),
    pytest.param(Case("gru", 2, 5, 1, 32, F32), BlockSizes(block_t=2), marks=SLOW),
    (Case("elman", 10, 3, 2, 16, BF16), BlockSizes(block_t=2, block_b=8)),
]


@pytest.mark.parametrize("case,blocks", TPU_CASES, ids=lambda c: getattr(c, "name", ""))
def test_pallas_tpu_interpret_matches_reference(case, blocks):
    args = make_inputs(case, seed=2)
    fn = functools.partial(pallas_tpu.flashrnn_pallas_tpu, function=case.function, blocks=blocks)
    with interpret():
        _check(fn, _ref(case.function), args, case.dtype)


@pytest.mark.parametrize(
    "function,implementation",
    [
        ("slstm", "pallas_gpu"),
        pytest.param("lstm", "pallas_gpu", marks=SLOW),
        pytest.param("gru", "pallas_tpu", marks=SLOW),
    ],
)
def test_custom_vjp_matches_autodiff_of_reference(function, implementation):
    args = make_inputs(Case(function, 2, 3, 2, 16, F32), seed=4)
    with interpret():
        check_custom_vjp_matches_autodiff(
            _impl(function, implementation), _ref(function), args, tol=1e-4
        )


# --- sLSTM stabilizer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation", ["reference", "pallas_gpu", pytest.param("xla", marks=SLOW)]
)
def test_slstm_stabilizer_large_inputs(implementation):
    """Gate inputs of ±100 would overflow exp() in fp32 without the m stabilizer."""
    case = Case("slstm", 2, 5 if implementation == "pallas_gpu" else 17, 2, 16, F32)
    wx, r, b, _ = make_inputs(case, seed=5, input_scale=100.0)

    def loss(wx, r, b):
        sa, last = flashrnn(wx, r, b, function="slstm", implementation=implementation)
        return jnp.sum(sa[0] ** 2) + jnp.sum(last[3])

    with interpret():
        (sa, last), (g_wx, g_r, g_b) = (
            flashrnn(wx, r, b, function="slstm", implementation=implementation),
            jax.grad(loss, argnums=(0, 1, 2))(wx, r, b),
        )
    for x in (sa, last, g_wx, g_r, g_b):
        assert np.all(np.isfinite(np.asarray(x)))
    # |c| ≤ n holds by induction from a zero state, so |y| = σ(o)|c|/n ≤ 1.
    assert float(jnp.max(jnp.abs(sa[0]))) <= 1.0 + 1e-5
    assert float(jnp.max(sa[3])) > 50.0  # the stabilizer did take large values
    if implementation != "reference":
        want = flashrnn(wx, r, b, function="slstm", implementation="reference")
        assert_close((sa, last), want, tol=1e-4)


# --- lowering for cuda and tpu at the benchmark shape -----------------------------------------


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering(case, platform):
    implementation = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    args = [jnp.zeros(x.shape, x.dtype) for x in jax.eval_shape(lambda: make_inputs(case))]

    def loss(*a):
        sa, last = flashrnn(*a, function=case.function, implementation=implementation)
        return jnp.sum(sa.astype(F32)) + jnp.sum(last.astype(F32))

    text = check_pallas_lowering(loss, args, platform, op="flashrnn", min_kernels=2)
    assert f"flashrnn_{case.function}_fwd" in text and f"flashrnn_{case.function}_bwd" in text


# --- API: defaults, step function, edge cases, errors -----------------------------------------


def test_cpu_default_is_xla_and_states_default_to_zeros():
    case = Case("lstm", 2, 5, 2, 16, F32)
    wx, r, b, s = make_inputs(case)
    name, _ = select_implementation("flashrnn", None, api.IMPLEMENTATIONS, wx, r, b, s, "lstm")
    assert name == "xla"
    got = flashrnn(wx, r, b, function="lstm")
    want = flashrnn(wx, r, b, jnp.zeros_like(s), function="lstm", implementation="reference")
    assert_close(got, want, tol=1e-5)


@pytest.mark.parametrize(
    "function",
    ["slstm", "gru", pytest.param("lstm", marks=SLOW), pytest.param("elman", marks=SLOW)],
)
def test_step_function_matches_sequence(function):
    wx, r, b, s = make_inputs(Case(function, 3, 4, 2, 16, F32), seed=6)
    step = jax.jit(functools.partial(flashrnn_step, function=function))
    outs = []
    for t in range(wx.shape[1]):
        s = step(wx[:, t], r, b, s)
        outs.append(s)
    sa, last = flashrnn(*make_inputs(Case(function, 3, 4, 2, 16, F32), seed=6), function=function)
    assert_close((jnp.stack(outs, axis=2), s), (sa, last), tol=1e-5)


def test_empty_sequence_returns_initial_states():
    wx, r, b, s = make_inputs(Case("slstm", 2, 3, 1, 16, F32))
    sa, last = flashrnn(wx[:, :0], r, b, s, function="slstm", implementation="pallas_tpu")
    assert sa.shape == (4, 2, 0, 1, 16)
    np.testing.assert_array_equal(last, s)


def test_nonfinite_input_stays_in_its_batch_row_and_head():
    wx, r, b, s = make_inputs(Case("gru", 2, 6, 2, 16, F32))
    wx = wx.at[0, 2, 0, 1, 3].set(jnp.nan)
    for implementation in ("reference", "xla"):
        sa, _ = flashrnn(wx, r, b, s, function="gru", implementation=implementation)
        assert np.isnan(float(sa[0, 0, 2, 1, 3]))  # the poisoned element at t=2,
        assert np.all(np.isnan(np.asarray(sa[0, 0, 3:, 1])))  # its whole head from t=3 on
        assert np.all(np.isfinite(np.asarray(sa[0, 0, :2])))
        assert np.all(np.isfinite(np.asarray(sa[0, 1])))  # other batch row
        assert np.all(np.isfinite(np.asarray(sa[0, 0, :, 0])))  # other head


def _good():
    return make_inputs(Case("lstm", 2, 3, 2, 16, F32))


@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        (lambda a: a, {"function": "lru"}, ValueError, "function must be one of"),
        (lambda a: (a[0][0],) + a[1:], {}, ValueError, "Wx must have rank 5"),
        (lambda a: (a[0][:, :, :3],) + a[1:], {}, ValueError, "G=4 gate inputs"),
        (
            lambda a: (a[0], a[1][:, :, :8]) + a[2:],
            {},
            ValueError,
            r"R must have shape \(4, 2, 16, 16\)",
        ),
        (lambda a: a[:2] + (a[2][:3],) + a[3:], {}, ValueError, r"b must have shape \(4, 2, 16\)"),
        (lambda a: a[:3] + (a[3][:1],), {}, ValueError, r"states must have shape \(2, 2, 2, 16\)"),
        (lambda a: (a[0].astype(jnp.int32),) + a[1:], {}, TypeError, "Wx must have dtype"),
        (lambda a: a, {"implementation": "cudnn"}, UnsupportedImplementationError, "available"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, kwargs, exc, match):
    args = mutate(_good())
    with pytest.raises(exc, match=match):
        flashrnn(*args, **{"function": "lstm", **kwargs})


def test_gru_shapes_and_step_errors():
    wx, r, b, s = make_inputs(Case("gru", 2, 3, 2, 16, F32))
    assert wx.shape[2] == 3 and r.shape[0] == 3 and b.shape[0] == 4
    with pytest.raises(ValueError, match=r"R must have shape \(3, 2, 16, 16\)"):
        flashrnn(wx, jnp.zeros((4, 2, 16, 16)), b, function="gru")
    with pytest.raises(ValueError, match="Wx must have rank 4"):
        flashrnn_step(wx, r, b, s, function="gru")


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_b=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(block_b=12)


# --- block_sizes through the public function; supports predicates ----------------------------


def _pallas_grids(fn, *args) -> dict[str, tuple]:
    """The grid of every pallas_call in ``fn``'s jaxpr (custom_vjp bodies included), by name."""
    grids = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids[eqn.params["name"]] = tuple(eqn.params["grid_mapping"].grid)
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


BLOCK_SIZES_CASES = [  # non-default blocks; B over several batch tiles (GPU: the last one padded)
    ("pallas_gpu", Case("gru", 37, 3, 2, 16, F32), BlockSizes(block_b=16, num_warps=2), (2, 3)),
    ("pallas_tpu", Case("lstm", 10, 5, 1, 16, BF16), BlockSizes(block_t=2, block_b=8), (1, 2, 3)),
    ("pallas_tpu", Case("slstm", 17, 3, 1, 16, F32), BlockSizes(block_t=2, block_b=8), (1, 3, 2)),
]


@pytest.mark.parametrize("implementation,case,blocks,grid", BLOCK_SIZES_CASES)
def test_block_sizes_pass_through_public_function(implementation, case, blocks, grid):
    args = make_inputs(case, seed=7)

    def fn(*a):
        return flashrnn(
            *a, function=case.function, implementation=implementation, block_sizes=blocks
        )

    with interpret():
        grad = jax.grad(_loss(case.function, implementation, block_sizes=blocks), (0, 1, 2, 3))
        grids = _pallas_grids(grad, *args)  # the forward and the backward kernel
        _check(fn, _ref(case.function), args, case.dtype)
    # the blocks reached the kernels: both grids tile B (and T) by them, B over several tiles
    for kernel in ("fwd", "bwd"):
        assert grids[f"flashrnn_{case.function}_{kernel}_{implementation[-3:]}"] == grid
    assert grid[1] > 1 and case.B > (blocks.block_b or 0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_b", 12),
        ("block_b", 0),
        ("block_t", 0),
        ("num_warps", -1),
        ("num_stages", 1.5),
        ("num_warps_bwd", 0),
    ],
)
def test_invalid_block_sizes_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes\.{field} must .*got {value}"):
        BlockSizes(**{field: value})


def test_block_sizes_of_wrong_type_raises():
    with pytest.raises(TypeError, match=r"block_sizes must be None or a .*BlockSizes, got str"):
        flashrnn(*_good(), function="lstm", block_sizes="x")


@pytest.mark.parametrize(
    "implementation,case,blocks,match",
    [
        (  # R resident in registers: D = 80 pads to 128, too many for the forward already
            "pallas_gpu",
            Case("lstm", 2, 3, 1, 80, F32),
            None,
            r"flashrnn_lstm_fwd_gpu: ~676 registers per thread at num_warps=4 exceed the 255 .*"
            r"D=80 padded to 128",
        ),
        (  # R and dR: the backward at D = 64 needs its default 8 warps
            "pallas_gpu",
            Case("lstm", 2, 3, 1, 64, BF16),
            BlockSizes(num_warps_bwd=4),
            r"flashrnn_lstm_bwd_gpu: ~370 registers per thread at num_warps=4 exceed the 255",
        ),
        ("pallas_gpu", Case("elman", 2, 3, 1, 16, F32), BlockSizes(block_b=8), "block_b=8 < 16"),
        (
            "pallas_tpu",
            Case("lstm", 2, 3, 1, 512, F32),
            None,
            r"flashrnn_lstm_bwd_tpu: ~\d+\.\d MiB of VMEM per grid step exceed the 16 MiB .*D=512",
        ),
        ("pallas_tpu", Case("slstm", 256, 64, 1, 128, F32), None, "block_t=16, block_b=128"),
    ],
)
def test_unsupported_shapes_raise_with_reason(implementation, case, blocks, match):
    args = jax.eval_shape(lambda: make_inputs(case))  # shapes only: nothing is allocated
    assert api.IMPLEMENTATIONS[implementation].reason_unsupported(*args, case.function, blocks)
    with interpret(), pytest.raises(UnsupportedImplementationError, match=match):
        flashrnn(*args, function=case.function, implementation=implementation, block_sizes=blocks)
    # smaller blocks make the big-batch TPU case fit
    if case.B == 256:
        small = BlockSizes(block_t=4, block_b=32)
        assert api.IMPLEMENTATIONS[implementation].supports(*args, case.function, small) is None


def _case(param) -> Case:
    values = param.values if hasattr(param, "marks") else param  # unwrap pytest.param
    return values[0] if isinstance(values, tuple) else values


def test_supports_accepts_the_tested_and_benchmarked_shapes():
    gpu_tested = [_case(p) for p in GPU_CASES] + list(LOWERING_CASES)
    tpu_tested = [_case(p) for p in (*GPU_CASES, *TPU_CASES)] + list(LOWERING_CASES)
    # accelerators benchmark in bf16; pallas_gpu stops at D = 64 (its D = 256 rows are skipped;
    # fp32 sLSTM at D = 48..64 needs more warps than the default, see the README)
    benchmarked = [dataclasses.replace(c, dtype=BF16) for c in BENCHMARK_CASES]
    for implementation, cases in (
        ("pallas_gpu", gpu_tested + [c for c in benchmarked if c.D <= 64]),
        ("pallas_tpu", tpu_tested + benchmarked),
    ):
        for case in cases:
            args = jax.eval_shape(lambda case=case: make_inputs(case))
            reason = api.IMPLEMENTATIONS[implementation].supports(*args, case.function)
            assert reason is None, (implementation, case.name, reason)


# --- precision: the requested precision reaches every product ---------------------------------


def _loss(function, implementation, **kwargs):
    def loss(*a):
        sa, last = flashrnn(*a, function=function, implementation=implementation, **kwargs)
        return jnp.sum(sa.astype(F32)) + jnp.sum(last.astype(F32))

    return loss


def _grad_fn(function, implementation, **kwargs):
    return jax.value_and_grad(_loss(function, implementation, **kwargs), argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("function", list(CELLS))
def test_precision_reaches_every_triton_dot(function):
    """fp32 inputs: the Gr forward and 3·Gr backward tt.dots are IEEE by default, TF32 on ask."""
    args = jax.eval_shape(lambda: make_inputs(Case(function, 16, 3, 1, 16, F32)))
    n_dots = 4 * CELLS[function].Gr  # h R; backward: h R (recompute), hᵀ dRy, dRy Rᵀ
    for kwargs, want in (({}, "ieee"), ({"precision": "tf32"}, "tf32")):
        text = export_mlir(_grad_fn(function, "pallas_gpu", **kwargs), args, "cuda")
        assert triton_dot_precisions(text) == [want] * n_dots, kwargs


def _dot_precisions(fn, *args) -> list:
    """``precision`` of every dot_general in ``fn``'s jaxpr, kernels and custom_vjp included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for v in eqn.params.values():
                for x in v if isinstance(v, tuple | list) else (v,):
                    inner = getattr(x, "jaxpr", x)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_gpu", "pallas_tpu"])
def test_precision_reaches_every_product(implementation):
    """Every fp32 product of the forward and the backward carries the requested precision."""
    args = jax.eval_shape(lambda: make_inputs(Case("gru", 3, 4, 2, 16, F32)))
    hi, lo = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
    for kwargs, want in (({}, hi), ({"precision": "highest"}, hi), ({"precision": "tf32"}, lo)):
        with interpret():
            found = _dot_precisions(_grad_fn("gru", implementation, **kwargs), *args)
        # the kernels: Gr products forward, 3·Gr backward; reference: one fused product in the
        # scan's body forward, its two transposes (dR, dh) in the backward scan's body; xla: the
        # same product forward, dh in its backward scan's body and dR after it
        assert len(found) == (4 * CELLS["gru"].Gr if implementation[:6] == "pallas" else 3)
        assert set(found) == {(want, want)}, (kwargs, set(found))


def test_tf32_precision_lowers_for_tpu():
    args = jax.eval_shape(lambda: make_inputs(Case("elman", 8, 3, 1, 16, F32)))
    loss = _loss("elman", "pallas_tpu", precision="tf32")
    check_pallas_lowering(loss, args, "tpu", op="flashrnn", min_kernels=2)


@pytest.mark.parametrize("precision", ["fp32", "HIGHEST", None, jax.lax.Precision.HIGHEST])
def test_invalid_precision_raises(precision):
    wx, r, b, s = _good()
    with pytest.raises(ValueError, match=r"flashrnn: precision must be one of \('highest', 'tf32'"):
        flashrnn(wx, r, b, s, function="lstm", precision=precision)
    with pytest.raises(ValueError, match=r"flashrnn_step: precision must be one of"):
        flashrnn_step(wx[:, 0], r, b, s, function="lstm", precision=precision)


# --- resource budgets: the kernels' working sets ----------------------------------------------


def test_default_blocks_fit_the_documented_shapes():
    """Both kernels of each backend fit an H100 SM / a v5e core at the lowering and benchmark
    shapes (bf16 on accelerators; pallas_gpu's D = 256 rows run on xla)."""
    bench = [dataclasses.replace(c, dtype=BF16) for c in BENCHMARK_CASES]
    for backend, limits, cases in (
        ("pallas_gpu", H100, list(LOWERING_CASES) + [c for c in bench if c.D <= 64]),
        ("pallas_tpu", TPU_V5E, list(LOWERING_CASES) + bench),
    ):
        for c in cases:
            ws = _common.working_set(backend, c.function, c.B, c.T, c.D, c.dtype)
            names = [f"flashrnn_{c.function}_{k}_{backend[-3:]}" for k in ("fwd", "bwd")]
            assert [w.kernel for w in ws] == names
            for w in ws:
                assert w.check(limits) is None, (c.name, w)


@pytest.mark.parametrize("function", list(CELLS))
def test_gpu_working_set_shows_r_and_dr_in_registers(function):
    """R (and dR) resident in registers: D = 64 fits, D = 128 does not (but for elman's single
    D×D matrix), D = 256 never."""

    def fits(D):
        ws = _common.working_set("pallas_gpu", function, 16, 512, D, BF16)
        return [w.check(H100) is None for w in ws]

    assert fits(64) == [True, True]
    assert fits(128) == ([True, True] if function == "elman" else [False, False])
    assert fits(256) == [False, False]


def test_xla_serves_what_pallas_gpu_rejects(monkeypatch):
    """On a GPU whose kernels are validated, None takes pallas_gpu at D = 64 and xla at D = 128."""
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    monkeypatch.setattr(dispatch, "current_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "why_not_default", lambda *a: None)
    hi = jax.lax.Precision.HIGHEST
    for D, want in ((64, "pallas_gpu"), (128, "xla")):
        args = jax.eval_shape(lambda D=D: make_inputs(Case("lstm", 16, 512, 4, D, BF16)))
        name, _ = select_implementation(
            "flashrnn", None, api.IMPLEMENTATIONS, *args, "lstm", None, hi
        )
        assert name == want, D


def test_working_set_estimates_by_hand():
    # Triton forward, lstm, bf16 R, D = 64, block_b = 16, 4 warps: R 4·64·64·2 = 32768 B, bias
    # 4·64·4 = 1024 B, 2·2 + 4 fp32 tiles of 16·64·4 = 4096 B: 66560 B over 128 threads is
    # 130 registers, + 32 overhead = 162.
    fwd, bwd = _common.working_set("pallas_gpu", "lstm", 16, 512, 64, BF16)
    assert fwd.live_bytes == 66560 and fwd.registers_per_thread == 162
    # The backward adds dR (4·64·64·4 = 65536 B) and holds 3·2 + 4 + 2·4 = 18 tiles: 173056 B over
    # 256 threads (8 warps) is 169 registers, + 32 = 201.
    assert bwd.live_bytes == 173056 and bwd.registers_per_thread == 201
    # Mosaic forward, elman fp32, D = 16, B = 10, T = 3, block_t = 2, block_b = 8; each block's
    # minor dims fill (8, 128) tiles of 4 B: Wx (2,1,8,128) 8192 + R (1,16,128) 8192 + b (1,8,128)
    # 4096 + s0 (1,8,128) 4096 + out (2,1,8,128) 8192 = 32768, double-buffered, + scratch 4096.
    blocks = BlockSizes(block_t=2, block_b=8)
    fwd, _ = _common.working_set("pallas_tpu", "elman", 10, 3, 16, F32, blocks)
    assert fwd.block_bytes == 32768 and fwd.vmem_bytes == 2 * 32768 + 4096
