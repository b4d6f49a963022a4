"""fft_conv: every implementation against the fp32 direct-convolution spec."""

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks
from jaxblocks.kernels import UnsupportedImplementationError, interpret
from jaxblocks.kernels.long_conv import _common, api, fft_conv, monarch, specs
from jaxblocks.kernels.long_conv.api import BlockSizes
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
    rel_rms,
)

PALLAS = ("pallas_gpu", "pallas_tpu")


def _fft(impl, **kw):
    def fn(u, k, D, pre, post):
        return fft_conv(u, k, D=D, pregate=pre, postgate=post, implementation=impl, **kw)

    # jit: one compilation instead of op-by-op dispatch (the interpreters are traced inside it)
    return jax.jit(fn)


def _fft_check(case, impl, **kw):
    u, k, D, pre, post = case.make()
    args = [u, k, D, pre, post]
    argnums = [i for i, a in enumerate(args) if a is not None]
    check_forward_and_vjp(
        _fft(impl, **kw), _fft("reference", **kw), args, dtype=case.dtype, argnums=argnums
    )


# ----------------------------------------------------------------------------------- fft_conv


@pytest.mark.parametrize("name", ["L1", "L7", "L64", "L1000", "L4096", "L1000_bf16"])
def test_xla_matches_reference(name):
    _fft_check(specs.TEST_CASES[name], "xla")


def test_xla_ungated_and_user_fft_size():
    case = specs.FFTConvCase(2, 3, 200, 150, gated=False)
    _fft_check(case, "xla", fft_size=1000)  # any N ≥ L + Lk − 1, not only powers of two


@pytest.mark.parametrize("impl,n", [("xla", 100), ("xla", 128), ("reference", 300)])
def test_circular_convolution(impl, n):
    case = specs.FFTConvCase(2, 3, 100, 60)
    u, k, D, pre, post = case.make()
    y = fft_conv(
        u, k, D=D, pregate=pre, postgate=post, causal=False, fft_size=n, implementation=impl
    )
    # Oracle in fp64 numpy: circular convolution of period n.
    v = np.asarray(u * pre, np.float64)
    c = np.fft.irfft(np.fft.rfft(v, n) * np.fft.rfft(np.asarray(k, np.float64), n)[None], n)
    want = (c[..., :100] + np.asarray(D)[None, :, None] * np.asarray(u)) * np.asarray(post)
    assert rel_rms(y, want) < 1e-5


def test_xla_largest_length_against_float64_fft():
    """L = 16384: the O(L²) direct reference is too slow for CI; numpy's fp64 FFT is the oracle."""
    u, k, D, pre, post = specs.TEST_CASES["L16384"].make()
    L = u.shape[-1]
    n = 2 * L
    uf, kf = np.asarray(u, np.float64), np.asarray(k, np.float64)
    pf, qf = np.asarray(pre, np.float64), np.asarray(post, np.float64)
    conv = lambda a, b: np.fft.irfft(np.fft.rfft(a, n) * np.fft.rfft(b, n), n)[..., :L]
    want = qf * (conv(uf * pf, kf[None]) + np.asarray(D)[None, :, None] * uf)
    y, vjp = jax.vjp(lambda u, k: _fft("xla")(u, k, D, pre, post), u, k)
    assert rel_rms(y, want) < 1e-5
    # du = pre ⊙ corr(post ⊙ g, k) + D ⊙ post ⊙ g at cotangent g; dk = Σ_b corr(post ⊙ g, pre ⊙ u).
    g = np.asarray(jax.random.normal(jax.random.key(3), y.shape), np.float64)
    dy = qf * g
    corr = lambda a, b: np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    du_want = pf * corr(dy, kf[None])[..., :L] + np.asarray(D)[None, :, None] * dy
    dk_want = corr(dy, uf * pf)[..., :L].sum(0)
    du, dk = vjp(jnp.asarray(g, jnp.float32))
    assert rel_rms(du, du_want) < 1e-5
    assert rel_rms(dk, dk_want) < 1e-5


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("name", list(specs.INTERPRET_TEST_CASES))
def test_pallas_interpret_matches_reference(impl, name):
    case = specs.INTERPRET_TEST_CASES[name]
    with interpret():
        _fft_check(case, impl)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_interpret_circular_and_ungated(impl):
    case = specs.FFTConvCase(1, 3, 256, 200, gated=False)
    with interpret():
        _fft_check(case, impl, causal=False, fft_size=256)


@pytest.mark.parametrize("impl,L", [("pallas_gpu", 30000), ("pallas_tpu", 4000)])
def test_pallas_interpret_large_fft_sizes_match_xla(impl, L):
    """N = 65536 (256 × 256 blocks) and N = 8192 (128 × 64): xla is the oracle (checked above)."""
    case = specs.FFTConvCase(1, 2, L, L)
    u, k, D, pre, post = case.make()
    with interpret():
        check_forward_and_vjp(_fft(impl), _fft("xla"), [u, k, D, pre, post], tol=1e-5)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_custom_vjp_matches_autodiff_of_reference(impl):
    u, k, D, pre, post = specs.FFTConvCase(1, 2, 50, 50).make()
    with interpret():
        check_custom_vjp_matches_autodiff(
            _fft(impl), _fft("reference"), [u, k, D, pre, post], tol=1e-4
        )


@pytest.mark.parametrize("platform,impl", [("cuda", "pallas_gpu"), ("tpu", "pallas_tpu")])
@pytest.mark.parametrize("case", specs.LOWERING_CASES, ids=lambda c: f"L{c.L}")
def test_pallas_lowering(platform, impl, case):
    B, H, L = case.B, case.H, case.L
    u = jnp.ones((B, H, L), case.dtype)
    k = jnp.ones((H, case.Lk), jnp.float32)
    D = jnp.ones((H,), jnp.float32)
    g = jnp.ones((B, H, L), case.dtype)

    def loss(u, k, D, pre, post):
        return jnp.sum(_fft(impl)(u, k, D, pre, post).astype(jnp.float32))

    # fused forward (gates, D, no postgate in the vjp path) + dv conv + dk correlation
    text = check_pallas_lowering(loss, [u, k, D, g, g], platform, op="fft_conv", min_kernels=3)
    assert "fft_xcorr_monarch" in text


def test_monarch_dft_is_the_fft():
    n = 512
    x = np.random.default_rng(0).standard_normal(n)
    n1, n2 = monarch.split(n)
    sr, si = monarch.dft(jnp.asarray(x, jnp.float32).reshape(n1, n2), *monarch.factors(n))
    want = np.fft.fft(x).reshape(n2, n1).T  # S[k1, k2] = X[k1 + N1·k2]
    assert rel_rms(sr, want.real) < 1e-5 and rel_rms(si, want.imag) < 1e-5
    back = monarch.idft_real(sr, si, *monarch.factors(n)) / n
    assert rel_rms(back.reshape(-1), x) < 1e-5


def test_auto_dispatch_uses_xla_on_cpu_and_gpu(monkeypatch):
    u, k, D, pre, post = specs.FFTConvCase(2, 3, 40, 40).make()
    assert_close(fft_conv(u, k, D=D), fft_conv(u, k, D=D, implementation="xla"), tol=0)
    # On a GPU the (untimed) Triton kernel is opt-in: automatic dispatch keeps XLA's FFT.
    import jaxblocks.kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    assert_close(fft_conv(u, k, D=D), fft_conv(u, k, D=D, implementation="xla"), tol=0)


def test_non_finite_inputs_stay_in_their_row():
    u, k, *_ = specs.FFTConvCase(2, 3, 100, 100, gated=False).make()
    u = u.at[0, 1, 5].set(jnp.nan)
    fns = [functools.partial(fft_conv, implementation="xla")]
    with interpret():
        fns.append(functools.partial(fft_conv, implementation="pallas_gpu"))
        for fn in fns:
            y = np.asarray(fn(u, k))
            assert np.isnan(y[0, 1]).any()
            assert np.isfinite(np.delete(y.reshape(6, -1), 1, axis=0)).all()


def _ok_args():
    return jnp.ones((2, 3, 16)), jnp.ones((3, 16))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda u, k: (u[0], k, {}), r"u must have rank 3"),
        (lambda u, k: (u, k[:2], {}), r"k must have shape \(3, .\?.\)"),
        (lambda u, k: (u, jnp.ones((3, 17)), {}), r"1 <= Lk <= L=16"),
        (lambda u, k: (u, k, {"D": jnp.ones((4,))}), r"D must have shape \(3,\)"),
        (lambda u, k: (u, k, {"pregate": jnp.ones((2, 3, 15))}), r"pregate must have shape"),
        (lambda u, k: (u, k, {"fft_size": 16}), r"wraps the causal convolution"),
        (lambda u, k: (u, k, {"causal": False, "fft_size": 8}), r"must be >= L=16"),
        (lambda u, k: (u, k, {"fft_size": 0}), r"fft_size must be a positive integer"),
        (lambda u, k: (u.astype(jnp.int32), k, {}), r"u must have dtype"),
        (lambda u, k: (jnp.ones((2, 3, 0)), jnp.ones((3, 0)), {}), r"non-empty sequence"),
        (lambda u, k: (u, k, {"implementation": "cuda"}), r"implementation must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    u, k, kw = mutate(*_ok_args())
    with pytest.raises((ValueError, TypeError), match=match):
        fft_conv(u, k, **kw)


def test_pallas_rejects_unsupported_fft_size():
    u, k = _ok_args()
    with pytest.raises(UnsupportedImplementationError, match="power of two in"):
        fft_conv(u, k, causal=False, fft_size=100, implementation="pallas_tpu")


# ---------------------------------------------------------------------------------------------
# block_sizes through the public function, its validation, the cost model, the backends' layout.


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


# Non-default launch parameters and what each backend's compiler params must show.
PUBLIC_BLOCKS = {
    "pallas_gpu": (BlockSizes(num_warps=2, num_stages=2), dict(num_warps=2, num_stages=2)),
    "pallas_tpu": (BlockSizes(vmem_limit_bytes=24 * 2**20), dict(vmem_limit_bytes=24 * 2**20)),
}


@pytest.mark.parametrize("impl", PALLAS)
def test_block_sizes_pass_through_public_function(impl):
    blocks, want = PUBLIC_BLOCKS[impl]
    case = specs.INTERPRET_TEST_CASES["L7_N256"]
    args = list(case.make(jax.random.key(5)))
    with interpret():
        check_forward_and_vjp(
            _fft(impl, block_sizes=blocks), _fft("reference"), args, dtype=case.dtype
        )
        loss = lambda *a: jnp.sum(_fft(impl, block_sizes=blocks)(*a) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args).jaxpr
    calls = _pallas_calls(jaxpr)
    suffix = impl[-3:]
    # forward (pre-postgate, fp32) and dv convolutions, dk correlation
    assert {n: len(p) for n, p in calls.items()} == {
        f"fft_conv_monarch_{suffix}": 2,
        f"fft_xcorr_monarch_{suffix}": 1,
    }
    for p in (p for ps in calls.values() for p in ps):
        assert tuple(p["grid_mapping"].grid) == (case.B, case.H)
        assert {k: getattr(p["compiler_params"], k) for k in want} == want


def test_default_block_sizes_give_the_default_launch_parameters():
    u, k, *_ = specs.FFTConvCase(1, 2, 3000, 3000, gated=False).make()  # N = 8192 > 4096
    for impl, want in (
        ("pallas_gpu", dict(num_warps=8, num_stages=1)),
        ("pallas_tpu", dict(vmem_limit_bytes=48 * 2**20)),
    ):
        with interpret():
            jaxpr = jax.make_jaxpr(functools.partial(fft_conv, implementation=impl))(u, k)
        (p,) = _pallas_calls(jaxpr.jaxpr)[f"fft_conv_monarch_{impl[-3:]}"]
        assert {key: getattr(p["compiler_params"], key) for key in want} == want


def test_kernel_cost_estimates_use_the_common_formulas():
    case = specs.FFTConvCase(2, 3, 300, 300, gated=False)  # N = 1024: 32 x 32 rows
    u, k, *_ = case.make()
    with interpret():
        jaxpr = jax.make_jaxpr(functools.partial(fft_conv, implementation="pallas_tpu"))(u, k)
    (p,) = _pallas_calls(jaxpr.jaxpr)["fft_conv_monarch_tpu"]
    rows, n = case.B * case.H, 1024
    io = 2 * rows * n * 4 + 2 * case.H * n * 4  # u and y rows, the filter spectrum (re, im)
    factors = 4 * (2 * 32 * 32 + 2 * 32 * 32 + 2 * n)
    assert p["cost_estimate"].flops == _common.flops(rows, n) == rows * (12 * n * 64 + 16 * n)
    assert p["cost_estimate"].bytes_accessed == _common.bytes_accessed(n, io) == io + factors
    assert case.flops() == _common.flops(rows, n)
    assert specs.BENCHMARK_CASES[0].flops() == _common.flops(16, 512)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_warps", 3),
        ("num_warps", 0),
        ("num_warps", 4.0),
        ("num_stages", 0),
        ("num_stages", True),
        ("vmem_limit_bytes", -1),
    ],
)
def test_block_sizes_field_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes\.{field} must be .*got {value!r}"):
        BlockSizes(**{field: value})


def test_block_sizes_of_the_wrong_type_raise_type_error():
    u, k = _ok_args()
    with pytest.raises(TypeError, match="block_sizes must be None or a .*BlockSizes, got str"):
        fft_conv(u, k, block_sizes="x")
    with pytest.raises(TypeError, match="block_sizes .* got dict"):
        fft_conv(u, k, block_sizes={"num_warps": 4}, implementation="xla")


def test_public_names():
    assert jaxblocks.fft_conv is fft_conv
    assert jaxblocks.kernels.long_conv.BlockSizes is BlockSizes
    assert not hasattr(jaxblocks.kernels.long_conv, "causal_conv1d")


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
            and (node.module or "").startswith("jaxblocks.kernels.long_conv")
            for alias in node.names
        }
        assert own == {("jaxblocks.kernels.long_conv", "_common")}, (name, own)


def test_non_finite_inputs_and_the_check_finite_guard():
    """One NaN spreads over its whole channel through the FFT (earlier outputs included);
    check_finite=True raises on concrete inputs and, traced, keeps the outputs before the first
    non-finite time exact and sets the rest of that channel to NaN."""
    from jaxblocks.kernels.long_conv.api import fft_conv

    u = jax.random.normal(jax.random.key(0), (2, 3, 40))
    k = 0.1 * jax.random.normal(jax.random.key(1), (3, 40))
    bad = u.at[0, 1, 25].set(jnp.nan)
    plain = fft_conv(bad, k, implementation="xla")
    assert bool(jnp.isnan(plain[0, 1, :25]).any())  # causality lost, as documented
    guarded = jax.jit(lambda a, b: fft_conv(a, b, check_finite=True, implementation="xla"))
    y = guarded(bad, k)
    want = fft_conv(bad.at[0, 1, 25].set(0.0), k, implementation="xla")
    np.testing.assert_array_equal(y[0, 1, :25], want[0, 1, :25])
    assert bool(jnp.isnan(y[0, 1, 25:]).all())
    np.testing.assert_array_equal(y[1], fft_conv(u, k, implementation="xla")[1])
    assert bool(jnp.isfinite(y[0, 0]).all() and jnp.isfinite(y[0, 2]).all())
    # a non-finite kernel lag j poisons outputs from t = j on, in every batch row
    y = guarded(u, k.at[2, 7].set(jnp.inf))
    assert bool(jnp.isnan(y[:, 2, 7:]).all()) and bool(jnp.isfinite(y[:, 2, :7]).all())
    # circular: the whole channel
    yc = jax.jit(lambda a, b: fft_conv(a, b, causal=False, check_finite=True))(bad, k)
    assert bool(jnp.isnan(yc[0, 1]).all()) and bool(jnp.isfinite(yc[1]).all())
    with pytest.raises(
        ValueError, match=r"fft_conv: u has a non-finite value nan at index \(0, 1, 25\)"
    ):
        fft_conv(bad, k, check_finite=True)
    with pytest.raises(ValueError, match=r"k has a non-finite value inf at index \(2, 7\)"):
        fft_conv(u, k.at[2, 7].set(jnp.inf), check_finite=True)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        fft_conv(u, k, check_finite="yes")


_HANG_SCRIPT = """
import jax, jax.numpy as jnp
from jaxblocks.kernels.long_conv import fft_conv
B, H, L = 2, 256, 4096
u = jax.random.normal(jax.random.key(0), (B, H, L))
k = jax.random.normal(jax.random.key(1), (H, L)) / L
f = jax.jit(jax.value_and_grad(
    lambda u, k: jnp.sum(fft_conv(u, k, implementation="xla") ** 2), argnums=(0, 1)))
for _ in range(8):
    jax.block_until_ready(f(u, k))
print("finished")
"""


def test_xla_forward_backward_does_not_hang_at_the_reported_shape():
    """B2 H256 L4096 forward+backward hung XLA:CPU with two concurrent FFT thunks (it did here
    on the second call with the old two-rfft form, tools/xla_cpu_fft_hang_repro.py); the xla
    path now runs one FFT at a time. In a subprocess, so a hang fails instead of stalling."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    root = pathlib.Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _HANG_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr[-2000:]
