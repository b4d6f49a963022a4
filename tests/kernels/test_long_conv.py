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
from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
    rel_rms,
)

PALLAS = ("pallas_gpu", "pallas_tpu")

# fp32 relative-RMS tolerance, about 10x the largest error measured in interpret mode (forward and
# every gradient; xla and both Pallas kernels vs the fp32 direct reference: <= 3.8e-7, the
# largest xla at L = 4096 and the kernels at N = 1024; the kernels vs xla at N = 4096 (GPU)
# 3.4e-7 and N = 65536 (TPU) 5.7e-7, the largest of all: dk).
FP32_TOL = 6e-6
# bf16: the harness's 2e-2. Inputs and outputs are rounded to bf16 (relative error up to 2^-9 each,
# ~2e-3 rms for a random row) around an fp32 computation; the gradients go through the same
# roundings of u, the gates and the cotangent, so a few 1e-3 are expected (measured: <= 2.6e-3).


def _fft(impl, **kw):
    def fn(u, k, D, pre, post):
        return fft_conv(u, k, D=D, pregate=pre, postgate=post, implementation=impl, **kw)

    # jit: one compilation instead of op-by-op dispatch (the interpreters are traced inside it)
    return jax.jit(fn)


def _fft_check(case, impl, **kw):
    u, k, D, pre, post = case.make()
    args = [u, k, D, pre, post]
    argnums = [i for i, a in enumerate(args) if a is not None]
    tol = FP32_TOL if case.dtype == jnp.float32 else None  # None: the harness's bf16 2e-2
    check_forward_and_vjp(
        _fft(impl, **kw), _fft("reference", **kw), args, dtype=case.dtype, argnums=argnums, tol=tol
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


@pytest.mark.parametrize("impl,L", [("pallas_gpu", 2000), ("pallas_tpu", 30000)])
def test_pallas_interpret_large_fft_sizes_match_xla(impl, L):
    """Each backend's largest FFT size: N = 4096 (64 × 64) on GPU, N = 65536 (256 × 256) on TPU;
    xla is the oracle (checked above)."""
    case = specs.FFTConvCase(1, 2, L, L)
    u, k, D, pre, post = case.make()
    with interpret():
        check_forward_and_vjp(_fft(impl), _fft("xla"), [u, k, D, pre, post], tol=FP32_TOL)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_custom_vjp_matches_autodiff_of_reference(impl):
    u, k, D, pre, post = specs.FFTConvCase(1, 2, 50, 50).make()
    with interpret():
        check_custom_vjp_matches_autodiff(
            _fft(impl), _fft("reference"), [u, k, D, pre, post], tol=FP32_TOL
        )


@pytest.mark.parametrize(
    "platform,impl,case",
    [
        (platform, impl, case)
        for platform, impl in (("cuda", "pallas_gpu"), ("tpu", "pallas_tpu"))
        for case in specs.LOWERING_CASES[impl]
    ],
    ids=lambda v: f"L{v.L}" if isinstance(v, specs.FFTConvCase) else str(v),
)
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
# precision: every DFT matmul of the forward and backward kernels follows the argument.


def _vg_args():
    u, k, D, pre, post = specs.FFTConvCase(1, 2, 100, 100).make()  # fp32, N = 256
    return [u, k, D, pre, post]


def _value_and_grad(impl, **kw):
    def loss(*a):
        return jnp.sum(_fft(impl, **kw)(*a) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


@pytest.mark.parametrize("precision,want", [(None, "ieee"), ("highest", "ieee"), ("tf32", "tf32")])
def test_triton_dots_follow_precision(precision, want):
    """fp32 inputs: the forward (12 matmuls), dv (12) and dk (18) kernels' tt.dots in the cuda
    export are IEEE fp32 by default and TF32 with precision="tf32"."""
    kw = {} if precision is None else {"precision": precision}
    text = export_mlir(_value_and_grad("pallas_gpu", **kw), _vg_args(), "cuda")
    assert triton_dot_precisions(text) == [want] * (2 * 12 + 18)


def _kernel_dot_precisions(jaxpr) -> list:
    """The precision of every dot_general inside the pallas_calls of ``jaxpr``."""
    return [
        e.params["precision"]
        for ps in _pallas_calls(jaxpr).values()
        for p in ps
        for e in p["jaxpr"].eqns
        if e.primitive.name == "dot_general"
    ]


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("precision", ["highest", "tf32"])
def test_kernel_dots_follow_precision_in_the_jaxpr(impl, precision):
    want = {"highest": jax.lax.Precision.HIGHEST, "tf32": jax.lax.Precision.DEFAULT}[precision]
    with interpret():
        jaxpr = jax.make_jaxpr(_value_and_grad(impl, precision=precision))(*_vg_args()).jaxpr
    precisions = _kernel_dot_precisions(jaxpr)
    assert len(precisions) == 2 * 12 + 18
    assert set(precisions) == {(want, want)}


def test_reference_follows_precision():
    u, k, D, pre, post = _vg_args()
    ref = functools.partial(fft_conv, implementation="reference", precision="tf32")
    # not jitted: the reference's one product, the depthwise convolution, is a top-level eqn
    jaxpr = jax.make_jaxpr(lambda u: ref(u, k, D=D, pregate=pre, postgate=post))(u).jaxpr
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert [e.params["precision"] for e in convs] == [
        (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)
    ]


@pytest.mark.parametrize("bad", ["fp32", "HIGHEST", None, jax.lax.Precision.HIGHEST])
def test_invalid_precision_raises_a_clear_error(bad):
    u, k = _ok_args()
    with pytest.raises(
        ValueError, match=r"fft_conv: precision must be one of \('highest', 'tf32'\)"
    ):
        fft_conv(u, k, precision=bad)


# ---------------------------------------------------------------------------------------------
# Resource budgets: the launches' working sets, checked without hardware.


def test_default_block_sizes_fit_at_the_documented_shapes():
    """Both backends at their lowering cases; the benchmark sizes fit on TPU (up to N = 64K),
    on GPU only up to N = 4096 (larger rows are refused with the kernel's name)."""
    for impl, cases in specs.LOWERING_CASES.items():
        for case in cases:
            n = _common.default_fft_size(case.L, case.Lk, True)
            for ws in _common.working_set(impl, n, None, case.dtype):
                assert _common.working_set_reason(ws) is None, (impl, case, ws)
    for case in specs.BENCHMARK_CASES:
        n = _common.default_fft_size(case.L, case.Lk, True)
        u = jax.ShapeDtypeStruct((case.B, case.H, case.L), case.dtype)
        reasons = {impl: _common.supports(impl, u, None, fft_size=n) for impl in PALLAS}
        if n > monarch.MAX_FFT_SIZE:
            assert all("power of two" in r for r in reasons.values()), reasons
        elif n > 4096:
            assert reasons["pallas_tpu"] is None
            assert reasons["pallas_gpu"].startswith("fft_conv_monarch_gpu (forward): ~")
        else:
            assert reasons == {"pallas_gpu": None, "pallas_tpu": None}, (n, reasons)


def test_working_set_by_hand():
    """N = 1024 (32 x 32 rows), fp32, default block sizes."""
    n = 1024
    factors = 2 * 32 * 32 + 2 * 32 * 32 + 2 * 32 * 32  # F1, F2, T: re and im
    gpu = _common.working_set("pallas_gpu", n)
    assert [w.kernel for w in gpu] == [
        "fft_conv_monarch_gpu (forward)",
        "fft_conv_monarch_gpu (backward dv)",
        "fft_xcorr_monarch_gpu (backward dk)",
    ]
    # 6144 factor + 7 x 1024 row fp32 values over 4 warps (128 threads): 104 registers + 32.
    assert gpu[0].live_bytes == 4 * (factors + 7 * n) == 53248
    assert gpu[0].num_warps == 4 and gpu[0].registers_per_thread == 53248 // 4 // 128 + 32 == 136
    assert gpu[0].shared_memory_bytes == 4 * (32 * 32 + 32 * 32)  # F1 @ A operands
    tpu = _common.working_set("pallas_tpu", n)
    # u, pre, post, Kr, Ki, fp32 output rows (6 x 4 KiB), D [1, 32], the factors (24 KiB), twice;
    # 7 fp32 rows of temporaries once.
    blocks = 6 * 4 * n + 4 * 32 + 4 * factors
    assert tpu[0].block_bytes == blocks == 49280
    assert tpu[0].vmem_bytes == 2 * blocks + 7 * 4 * n == 127232
    assert tpu[2].block_bytes == 3 * 4 * n + 4 * factors  # dk: dy, v in, one row out


@pytest.mark.parametrize(
    "impl,L,blocks,match",
    [
        # N = 8192: 480 registers per thread at the default 8 warps
        ("pallas_gpu", 3000, None, r"fft_conv_monarch_gpu \(forward\): ~480 registers per thread"),
        # N = 2048 fits at 8 warps (144 registers), not at 2 (~480)
        ("pallas_gpu", 1000, BlockSizes(num_warps=2), r"fft_conv_monarch_gpu .*num_warps=2"),
        # N = 2048: ~0.26 MiB of VMEM per grid step, above a 128 KiB limit
        (
            "pallas_tpu",
            1000,
            BlockSizes(vmem_limit_bytes=2**17),
            r"fft_conv_monarch_tpu \(forward\): ~0.3 MiB of VMEM .*BlockSizes.vmem_limit_bytes",
        ),
    ],
)
def test_configurations_that_cannot_fit_are_rejected(impl, L, blocks, match):
    u, k, D, pre, post = specs.FFTConvCase(1, 2, L, L).make()
    with pytest.raises(UnsupportedImplementationError, match=f"{impl}.*{match}"):
        fft_conv(u, k, D=D, pregate=pre, postgate=post, implementation=impl, block_sizes=blocks)


def test_register_file_bounds_the_warps():
    """32 warps at N = 8192 spread the row to 144 registers per thread (under the 255 a thread
    may have), but 1024 threads of 144 registers need more than the SM's 64K."""
    (fwd, *_) = _common.working_set("pallas_gpu", 8192, BlockSizes(num_warps=32))
    assert fwd.registers_per_thread <= 255
    want = "registers per thread x 1024 threads exceed the 65536"
    assert want in fwd.check() and want in _common.working_set_reason(fwd)


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
            _fft(impl, block_sizes=blocks), _fft("reference"), args, dtype=case.dtype, tol=FP32_TOL
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


@pytest.mark.parametrize(
    "impl,L,want",
    [
        ("pallas_gpu", 300, dict(num_warps=4, num_stages=1)),  # N = 1024
        ("pallas_gpu", 1500, dict(num_warps=8, num_stages=1)),  # N = 4096 > 1024
        ("pallas_tpu", 3000, dict(vmem_limit_bytes=48 * 2**20)),  # N = 8192
    ],
)
def test_default_block_sizes_give_the_default_launch_parameters(impl, L, want):
    u, k, *_ = specs.FFTConvCase(1, 2, L, L, gated=False).make()
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
