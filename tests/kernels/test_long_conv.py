"""fft_conv and causal_conv1d: every implementation against the fp32 direct-convolution spec."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import UnsupportedImplementationError, interpret
from jaxblocks.kernels.long_conv import causal_conv1d, fft_conv, monarch, specs
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
    _fft_check(specs.FFT_CONV_CASES[name], "xla")


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
    u, k, D, pre, post = specs.FFT_CONV_CASES["L16384"].make()
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
@pytest.mark.parametrize("name", list(specs.PALLAS_INTERPRET_CASES))
def test_pallas_interpret_matches_reference(impl, name):
    case = specs.PALLAS_INTERPRET_CASES[name]
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
@pytest.mark.parametrize("L", specs.LOWERING_LENGTHS)
def test_pallas_lowering(platform, impl, L):
    B, H = 2, 16
    u = jnp.ones((B, H, L), jnp.bfloat16)
    k = jnp.ones((H, L), jnp.float32)
    D = jnp.ones((H,), jnp.float32)
    g = jnp.ones((B, H, L), jnp.bfloat16)

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


# ------------------------------------------------------------------------------ causal_conv1d


def _short(impl, act):
    return jax.jit(lambda x, w, b: causal_conv1d(x, w, b, act, implementation=impl))


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("name", list(specs.SHORT_CONV_CASES))
def test_causal_conv1d_xla_matches_reference(name, act):
    case = specs.SHORT_CONV_CASES[name]
    check_forward_and_vjp(
        _short("xla", act), _short("reference", act), case.make(), dtype=case.dtype
    )


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("name,act", [("W4", "silu"), ("W8_long", None)])
def test_causal_conv1d_pallas_interpret(impl, name, act):
    case = specs.SHORT_CONV_CASES[name]
    with interpret():
        check_forward_and_vjp(
            _short(impl, act), _short("reference", act), case.make(), dtype=case.dtype
        )


def test_causal_conv1d_is_causal_and_takes_no_bias():
    x, w, _ = specs.SHORT_CONV_CASES["W4"].make()
    y = causal_conv1d(x, w)
    y2 = causal_conv1d(x.at[:, 20:].set(100.0), w)
    np.testing.assert_array_equal(y[:, :20], y2[:, :20])
    assert not np.allclose(y[:, 20:], y2[:, 20:])


@pytest.mark.parametrize("platform,impl", [("cuda", "pallas_gpu"), ("tpu", "pallas_tpu")])
def test_causal_conv1d_lowering(platform, impl):
    x = jnp.ones((4, 4096, 512), jnp.bfloat16)
    w, b = jnp.ones((4, 512)), jnp.ones((512,))

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
    x, w, b = specs.SHORT_CONV_CASES["W4"].make()
    y = np.asarray(causal_conv1d(x.at[0, 10, 2].set(jnp.inf), w, b))
    assert not np.isfinite(y[0, 10:14, 2]).all()
    assert np.isfinite(y[0, :10]).all() and np.isfinite(y[1]).all()
