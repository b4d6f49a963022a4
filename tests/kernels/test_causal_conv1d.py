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


def _short(impl, act, **kw):
    return jax.jit(lambda x, w, b: causal_conv1d(x, w, b, act, implementation=impl, **kw))


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("name", list(specs.TEST_CASES))
def test_causal_conv1d_xla_matches_reference(name, act):
    case = specs.TEST_CASES[name]
    check_forward_and_vjp(
        _short("xla", act), _short("reference", act), case.make(), dtype=case.dtype
    )


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("name,act", [("W4", "silu"), ("W8_long", None)])
def test_causal_conv1d_pallas_interpret(impl, name, act):
    case = specs.TEST_CASES[name]
    with interpret():
        check_forward_and_vjp(
            _short(impl, act), _short("reference", act), case.make(), dtype=case.dtype
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
        check_forward_and_vjp(op, _short("reference", act), args)
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
