"""causal_conv1d: every implementation against the fp32 tap-loop spec."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks
from jaxblocks.kernels import UnsupportedImplementationError, interpret
from jaxblocks.kernels.causal_conv1d import _common, api, specs
from jaxblocks.kernels.causal_conv1d.api import BlockSizes, causal_conv1d
from tests.kernels.harness import check_forward_and_vjp, check_pallas_lowering

PALLAS = ("pallas_gpu", "pallas_tpu")

# fp32 relative-RMS tolerance, about 10x the largest error measured in interpret mode (forward and
# every gradient, xla and both Pallas kernels vs the fp32 tap loop, TEST_CASES with and without
# silu): 3.5e-7 (xla's dw at W = 8 with silu; the kernels <= 1.0e-7).
FP32_TOL = 4e-6
# bf16: the harness's 2e-2. x and y are rounded to bf16 (relative error up to 2^-9 each, ~2e-3
# rms) around an fp32 computation, the cotangent too: measured <= 2.5e-3 (W4_bf16 with silu).


def _tol(case):
    return FP32_TOL if case.dtype == jnp.float32 else None  # None: the harness's bf16 2e-2


def _short(impl, act, **kw):
    return jax.jit(lambda x, w, b: causal_conv1d(x, w, b, act, implementation=impl, **kw))


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("name", list(specs.TEST_CASES))
def test_causal_conv1d_xla_matches_reference(name, act):
    case = specs.TEST_CASES[name]
    check_forward_and_vjp(
        _short("xla", act), _short("reference", act), case.make(), dtype=case.dtype, tol=_tol(case)
    )


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("name,act", [("W4", "silu"), ("W8_long", None)])
def test_causal_conv1d_pallas_interpret(impl, name, act):
    case = specs.TEST_CASES[name]
    with interpret():
        check_forward_and_vjp(
            _short(impl, act),
            _short("reference", act),
            case.make(),
            dtype=case.dtype,
            tol=_tol(case),
        )


def test_causal_conv1d_is_causal_and_takes_no_bias():
    x, w, _ = specs.TEST_CASES["W4"].make()
    y = causal_conv1d(x, w)
    y2 = causal_conv1d(x.at[:, 20:].set(100.0), w)
    np.testing.assert_array_equal(y[:, :20], y2[:, :20])
    assert not np.allclose(y[:, 20:], y2[:, 20:])


@pytest.mark.parametrize("platform,impl", [("cuda", "pallas_gpu"), ("tpu", "pallas_tpu")])
@pytest.mark.parametrize("name", list(specs.LOWERING_CASES))
def test_causal_conv1d_lowering(platform, impl, name):
    case = specs.LOWERING_CASES[name]
    x = jnp.ones((case.B, case.T, case.C), case.dtype)
    w, b = jnp.ones((case.W, case.C)), jnp.ones((case.C,))

    def loss(x, w, b):
        return jnp.sum(causal_conv1d(x, w, b, "silu", implementation=impl).astype(jnp.float32))

    check_pallas_lowering(loss, [x, w, b], platform, op="causal_conv1d", min_kernels=2)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((jnp.ones((2, 5)), jnp.ones((4, 5))), {}, r"x must have rank 3"),
        ((jnp.ones((2, 5, 3)), jnp.ones((9, 3))), {}, r"1 <= W <= 8"),
        ((jnp.ones((2, 5, 3)), jnp.ones((4, 2))), {}, r"w must have shape \(.\?., 3\)"),
        ((jnp.ones((2, 5, 3)), jnp.ones((4, 3)), jnp.ones((2,))), {}, r"bias must have shape"),
        ((jnp.ones((2, 5, 3)), jnp.ones((4, 3)), None, "relu"), {}, r"activation must be"),
        ((jnp.ones((2, 0, 3)), jnp.ones((4, 3))), {}, r"non-empty time axis"),
    ],
)
def test_causal_conv1d_bad_inputs(args, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        causal_conv1d(*args, **kw)


def test_causal_conv1d_non_finite_propagates_forward_only():
    x, w, b = specs.TEST_CASES["W4"].make()
    y = np.asarray(causal_conv1d(x.at[0, 10, 2].set(jnp.inf), w, b))
    assert not np.isfinite(y[0, 10:14, 2]).all()
    assert np.isfinite(y[0, :10]).all() and np.isfinite(y[1]).all()


def test_public_names():
    assert jaxblocks.causal_conv1d is causal_conv1d
    assert jaxblocks.kernels.causal_conv1d.causal_conv1d is causal_conv1d
    assert jaxblocks.kernels.causal_conv1d.BlockSizes is BlockSizes


# ---------------------------------------------------------------------------------------------
# block_sizes through the public function, its validation, supports, the cost model.


def _pallas_calls(jaxpr) -> dict[str, list[dict]]:
    """{kernel name: [pallas_call params, ...]} over ``jaxpr`` and its sub-jaxprs."""
    calls: dict[str, list[dict]] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            calls.setdefault(eqn.params["name"], []).append(eqn.params)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    for name, ps in _pallas_calls(sub).items():
                        calls.setdefault(name, []).extend(ps)
    return calls


# x [2, 45, 130], W = 8 (the widest kernel: on TPU block_t = 8 keeps the whole look-back of 7
# rows in the previous tile). GPU: 3 time tiles of 16 inside each program, channels padded to
# 192 in 3 blocks of 64, 2 warps (defaults: 64 x 32 -> grid (2, 5)). TPU: 6 time tiles of 8,
# channels padded to 256 in one block of 256 (defaults: 48 x 128 -> grid (2, 2, 1)).
PUBLIC_CASE = specs.Case(2, 45, 130, 8)
PUBLIC_BLOCKS = {
    "pallas_gpu": (BlockSizes(block_t=16, block_c=64, num_warps=2), (2, 3)),
    "pallas_tpu": (BlockSizes(block_t=8, block_c=256), (2, 1, 6)),
}


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("impl", PALLAS)
def test_block_sizes_pass_through_public_function(impl, act):
    blocks, want_grid = PUBLIC_BLOCKS[impl]
    args = PUBLIC_CASE.make(jax.random.key(7))
    op = _short(impl, act, block_sizes=blocks)
    with interpret():
        check_forward_and_vjp(op, _short("reference", act), args, tol=FP32_TOL)
        loss = lambda *a: jnp.sum(op(*a) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr
    calls = _pallas_calls(jaxpr)[f"causal_conv1d_{impl[-3:]}"]
    assert len(calls) == 2  # the forward (silu: its pre-activation) and dx
    assert {tuple(p["grid_mapping"].grid) for p in calls} == {want_grid}
    if impl == "pallas_gpu":
        assert all(p["compiler_params"].num_warps == 2 for p in calls)


def test_kernel_cost_estimates_use_the_common_formulas():
    x, w, b = PUBLIC_CASE.make()
    for impl, x_reads in (("pallas_gpu", 1), ("pallas_tpu", 2)):
        with interpret():
            jaxpr = jax.make_jaxpr(_short(impl, "silu"))(x, w, b)
        (params,) = _pallas_calls(jaxpr.jaxpr)[f"causal_conv1d_{impl[-3:]}"]
        cost = params["cost_estimate"]
        B, T, C, W = PUBLIC_CASE.B, PUBLIC_CASE.T, PUBLIC_CASE.C, PUBLIC_CASE.W
        assert cost.flops == _common.flops(B, T, C, W) == 2 * B * T * C * W
        assert cost.transcendentals == B * T * C
        assert cost.bytes_accessed == (x_reads + 1) * B * T * C * 4 + W * C * 4
    assert PUBLIC_CASE.flops() == 2 * B * T * C * W


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_t", 12),
        ("block_t", 0),
        ("block_t", True),
        ("block_c", 8),
        ("block_c", 48),
        ("block_c", 16.0),
        ("num_warps", 0),
        ("num_warps", 3),
    ],
)
def test_block_sizes_field_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes\.{field} must be .*got {value!r}"):
        BlockSizes(**{field: value})


def test_block_sizes_of_the_wrong_type_raise_type_error():
    x, w, b = specs.TEST_CASES["W4"].make()
    with pytest.raises(TypeError, match="block_sizes must be None or a .*BlockSizes, got str"):
        causal_conv1d(x, w, b, block_sizes="x")
    with pytest.raises(TypeError, match="block_sizes .* got dict"):
        causal_conv1d(x, w, b, block_sizes={"block_t": 16}, implementation="xla")


@pytest.mark.parametrize(
    ("impl", "blocks", "match"),
    [
        ("pallas_gpu", BlockSizes(block_t=24), "block_t must be a power of two >= 16"),
        ("pallas_gpu", BlockSizes(block_c=384), "block_c must be a power of two >= 16"),
        ("pallas_tpu", BlockSizes(block_c=64), "block_c must be a multiple of 128"),
    ],
)
def test_unsupported_block_sizes_name_the_reason(impl, blocks, match):
    x, w, b = specs.TEST_CASES["W4"].make()
    with interpret(), pytest.raises(UnsupportedImplementationError, match=f"{impl}.*{match}"):
        causal_conv1d(x, w, b, implementation=impl, block_sizes=blocks)
    # Each backend's rule is its own: the other backend takes these block sizes, and automatic
    # dispatch (xla on CPU) is not affected.
    other = "pallas_tpu" if impl == "pallas_gpu" else "pallas_gpu"
    assert api.IMPLEMENTATIONS[other].reason_unsupported(x, w, b, None, block_sizes=blocks) is None
    np.testing.assert_array_equal(
        causal_conv1d(x, w, b, block_sizes=blocks), causal_conv1d(x, w, b, implementation="xla")
    )


# ---------------------------------------------------------------------------------------------
# precision: only the xla path has a product; the kernels are elementwise.


def test_precision_reaches_the_xla_convolution():
    x, w, b = specs.TEST_CASES["W4"].make()
    for name, want in (("highest", jax.lax.Precision.HIGHEST), ("tf32", jax.lax.Precision.DEFAULT)):
        f = lambda x, name=name: causal_conv1d(x, w, b, implementation="xla", precision=name)
        convs = [e for e in jax.make_jaxpr(f)(x).eqns if e.primitive.name == "conv_general_dilated"]
        assert [e.params["precision"] for e in convs] == [(want, want)]


@pytest.mark.parametrize("impl", PALLAS)
def test_kernels_are_elementwise_and_ignore_precision(impl):
    args = specs.TEST_CASES["W4"].make()
    with interpret():
        loss = lambda p: lambda *a: jnp.sum(_short(impl, "silu", precision=p)(*a) ** 2)
        vg = {p: jax.value_and_grad(loss(p), argnums=(0, 1, 2)) for p in ("highest", "tf32")}
        jaxpr = jax.make_jaxpr(vg["tf32"])(*args).jaxpr
        want, got = vg["highest"](*args), vg["tf32"](*args)
    kernels = [p["jaxpr"] for ps in _pallas_calls(jaxpr).values() for p in ps]
    assert len(kernels) == 2
    assert not [e for k in kernels for e in k.eqns if e.primitive.name == "dot_general"]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["fp32", "HIGH", None, jax.lax.Precision.HIGHEST])
def test_invalid_precision_raises_a_clear_error(bad):
    x, w, b = specs.TEST_CASES["W4"].make()
    with pytest.raises(ValueError, match=r"causal_conv1d: precision must be one of \('highest', "):
        causal_conv1d(x, w, b, precision=bad)


# ---------------------------------------------------------------------------------------------
# Resource budgets: the launches' working sets, checked without hardware.


@pytest.mark.parametrize("impl", PALLAS)
def test_default_block_sizes_fit_at_the_documented_shapes(impl):
    cases = [*specs.TEST_CASES.values(), *specs.LOWERING_CASES.values(), *specs.BENCHMARK_CASES]
    for case in cases:
        x = jax.ShapeDtypeStruct((case.B, case.T, case.C), case.dtype)
        w = jax.ShapeDtypeStruct((case.W, case.C), jnp.float32)
        assert api.IMPLEMENTATIONS[impl].reason_unsupported(x, w, None, "silu") is None, case
        sets = _common.working_set(impl, x.shape, case.W, None, case.dtype)
        assert [s.kernel for s in sets] == [
            f"causal_conv1d_{impl[-3:]} (forward)",
            f"causal_conv1d_{impl[-3:]} (backward dx)",
        ]


def test_working_set_by_hand():
    # GPU, default 64 x 32 tiles over 4 warps, W = 4, fp32: the accumulator, 4 windows, 4 taps
    # and the bias in fp32 = 41600 bytes -> ceil(41600 / 4 / 128) = 82 registers + 32.
    fwd, dx = _common.working_set("pallas_gpu", (4, 4096, 512), 4)
    assert fwd.live_bytes == 4 * (64 * 32 + 4 * 64 * 32 + 5 * 32) == 41600
    assert fwd.registers_per_thread == 82 + 32 and fwd.shared_memory_bytes == 0
    # TPU, default 256 x 128 tiles, bf16 x: previous, current and output tiles in bf16, taps and
    # bias in fp32, twice; the fp32 [512, 128] scratch and two fp32 [256, 128] temporaries once.
    fwd, dx = _common.working_set("pallas_tpu", (4, 4096, 512), 4, None, jnp.bfloat16)
    assert fwd.block_bytes == 3 * 256 * 128 * 2 + 5 * 128 * 4 == 199168
    assert fwd.vmem_bytes == 2 * 199168 + 4 * 256 * 128 * 4 == 922624
    assert dx.block_bytes == 3 * 256 * 128 * 4 + 5 * 128 * 4  # the gradient is fp32
    # a short sequence shrinks the TPU time tile to T rounded up to 8: 40 rows for T = 37
    (fwd, _) = _common.working_set("pallas_tpu", (2, 37, 20), 4)
    assert fwd.scratch_bytes == 4 * 40 * 128 * 4


@pytest.mark.parametrize(
    "impl,shape,blocks,match",
    [
        # 512 x 256 tiles over 4 warps: ~2 MiB of live values, thousands of registers a thread
        (
            "pallas_gpu",
            (1, 37, 20),
            BlockSizes(block_t=512, block_c=256),
            r"causal_conv1d_gpu \(forward\): ~\d+ registers per thread at num_warps=4",
        ),
        # 32 warps of a 64 x 256 tile fit 255 registers a thread, not the SM's register file
        (
            "pallas_gpu",
            (1, 37, 20),
            BlockSizes(block_t=64, block_c=256, num_warps=32),
            r"causal_conv1d_gpu \(forward\): .* x 1024 threads exceed the 65536 registers",
        ),
        # one 4096 x 2048 fp32 tile is 32 MiB
        (
            "pallas_tpu",
            (1, 4096, 3),
            BlockSizes(block_t=4096, block_c=2048),
            r"causal_conv1d_tpu \(forward\): ~\d+\.\d MiB of VMEM per grid step exceed the 16",
        ),
    ],
)
def test_configurations_that_cannot_fit_are_rejected(impl, shape, blocks, match):
    x = jax.random.normal(jax.random.key(3), shape)
    w = jax.random.normal(jax.random.key(4), (4, shape[2]))
    with pytest.raises(UnsupportedImplementationError, match=f"{impl}.*{match}"):
        causal_conv1d(x, w, implementation=impl, block_sizes=blocks)


def _function_bodies(path: pathlib.Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {
        ast.dump(ast.Module(body=node.body, type_ignores=[])): node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and len(node.body) >= 3
    }


def test_backends_share_no_function_body_and_import_only_common():
    folder = pathlib.Path(api.__file__).parent
    gpu = _function_bodies(folder / "pallas_gpu.py")
    tpu = _function_bodies(folder / "pallas_tpu.py")
    assert not gpu.keys() & tpu.keys(), sorted(gpu[k] for k in gpu.keys() & tpu.keys())
    for name in ("pallas_gpu.py", "pallas_tpu.py"):
        tree = ast.parse((folder / name).read_text())
        own = {
            (node.module, alias.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("jaxblocks.kernels.causal_conv1d")
            for alias in node.names
        }
        assert all(m.endswith("._common") or a == "_common" for m, a in own), (name, own)
