"""FRCRN's complex layers: STFT/iSTFT, complex conv / transposed conv / BN, causal and complex
FSMNs, complex SE — against NumPy complex arithmetic and direct loops; the official ConvSTFT
rebuilt in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.complex_nn import (
    CausalUniDeepFsmn,
    ComplexBatchNorm,
    ComplexConv2d,
    ComplexConvTranspose2d,
    ComplexSE,
    ComplexUniDeepFsmn,
    ComplexUniDeepFsmnFreq,
    ConviSTFT,
    ConvSTFT,
    causal_fsmn_memory,
    conv_istft,
    conv_stft,
    stft_kernels,
    stft_window,
)
from jaxblocks.layers.fsmn import fsmn_memory


def _rand(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def _cplx(x):
    x = np.asarray(x, np.float64)
    return x[..., 0] + 1j * x[..., 1]


@pytest.mark.parametrize("win,hop,fft", [(640, 320, 640), (64, 16, 64), (48, 24, 64)])
def test_stft_istft_reconstructs_away_from_the_edges(win, hop, fft):
    x = _rand(0, (2, 12 * win), 0.3)
    y = ConviSTFT(win, hop, fft).apply({}, ConvSTFT(win, hop, fft).apply({}, x))
    frames = (x.shape[1] - win) // hop + 1
    assert y.shape == (2, (frames - 1) * hop + win)
    # Exact where the squared windows overlap fully: one hop in from each end.
    err = np.abs(np.asarray(y - x[:, : y.shape[1]]))[:, win : y.shape[1] - win]
    assert err.max() < 1e-5


def test_stft_is_the_windowed_rfft_of_each_frame():
    win, hop, fft = 48, 16, 64
    x = np.asarray(_rand(1, (1, 200)), np.float64)
    spec = _cplx(conv_stft(jnp.asarray(x, jnp.float32), win, hop, fft))  # [1, F, T]
    w = stft_window(win)
    for t in range(spec.shape[-1]):
        want = np.fft.rfft(x[0, t * hop : t * hop + win] * w, n=fft)
        np.testing.assert_allclose(spec[0, :, t], want, atol=2e-4)


def test_window_is_sqrt_periodic_hann_and_overlap_adds_to_one():
    w = stft_window(8)
    np.testing.assert_allclose(w**2, 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(8) / 8))
    ola = w[:4] ** 2 + w[4:] ** 2
    np.testing.assert_allclose(ola, 1.0, atol=1e-12)
    np.testing.assert_allclose(stft_window(8, "hamming") ** 2,
                               0.54 - 0.46 * np.cos(2 * np.pi * np.arange(8) / 8))  # fmt: skip
    fwd, inv, _ = stft_kernels(32, 16, 64)
    assert fwd.shape == (32, 66) and inv.shape == (66, 32)


def _np_correlate2d(x, w, stride, pad):
    """x [B, H, W, C] complex, w [kh, kw, C, D] complex: torch-style conv2d."""
    x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = (x.shape[1] - kh) // stride[0] + 1, (x.shape[2] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]), complex)
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw]
            out[:, i, j] = np.einsum("bhwc,hwcd->bd", patch, w)
    return out


def test_complex_conv2d_is_complex_arithmetic():
    x = _rand(2, (2, 11, 6, 3, 2))
    conv = ComplexConv2d(4, (5, 2), strides=(2, 1), padding=(0, 1))
    v = conv.init(jax.random.key(3), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    w = p["conv_re"]["kernel"] + 1j * p["conv_im"]["kernel"]
    bias = p["conv_re"]["bias"] - p["conv_im"]["bias"] + 1j * (
        p["conv_re"]["bias"] + p["conv_im"]["bias"])  # fmt: skip
    want = _np_correlate2d(_cplx(x), w, (2, 1), (0, 1)) + bias
    got = _cplx(conv.apply(v, x))
    assert got.shape == (2, 4, 7, 4)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_complex_conv_transpose2d_is_torch_semantics_in_complex_arithmetic():
    x = _rand(4, (2, 4, 5, 3, 2))
    tconv = ComplexConvTranspose2d(2, (5, 2), strides=(2, 1), padding=(1, 1))
    v = tconv.init(jax.random.key(5), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    w = p["tconv_re_kernel"] + 1j * p["tconv_im_kernel"]  # [kh, kw, C, D]
    xc = _cplx(x)
    full = np.zeros((2, (4 - 1) * 2 + 5, (5 - 1) + 2, 2), complex)
    for i in range(4):
        for j in range(5):
            for a in range(5):
                for b in range(2):
                    full[:, 2 * i + a, j + b] += xc[:, i, j] @ w[a, b]
    bias = p["tconv_re_bias"] - p["tconv_im_bias"] + 1j * (
        p["tconv_re_bias"] + p["tconv_im_bias"])  # fmt: skip
    want = full[:, 1:-1, 1:-1] + bias
    got = _cplx(tconv.apply(v, x))
    assert got.shape == (2, 9, 4, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_complex_batchnorm_is_two_real_batchnorms_not_whitening():
    re = _rand(6, (4, 5, 6, 3))
    x = jnp.stack([re, 0.8 * re + 0.3 * _rand(7, re.shape) + 2.0], -1)  # correlated parts
    bn = ComplexBatchNorm()
    v = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    y = np.asarray(y)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, atol=1e-3)
    # The naive form keeps the real/imag correlation (a whitening would remove it).
    corr = np.corrcoef(y[..., 0, 0].ravel(), y[..., 0, 1].ravel())[0, 1]
    assert corr > 0.8
    xm = np.asarray(x).mean((0, 1, 2))  # [C, 2]
    np.testing.assert_allclose(upd["batch_stats"]["bn_im"]["mean"], 0.1 * xm[:, 1], rtol=1e-5)
    # eval mode uses the running statistics: initial (0, 1) -> identity up to eps
    np.testing.assert_allclose(bn.apply(v, x), x / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def test_causal_fsmn_memory_is_a_direct_causal_convolution():
    p = _rand(8, (2, 13, 5))
    k = _rand(9, (4, 5))
    got = np.asarray(causal_fsmn_memory(p, k))
    pn, kn = np.asarray(p, np.float64), np.asarray(k, np.float64)
    want = np.zeros_like(pn)
    for t in range(13):
        for j in range(4):
            s = t - 3 + j
            if s >= 0:
                want[:, t] += kn[j] * pn[:, s]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # = the symmetric FSMN memory with zero future taps
    sym = fsmn_memory(p, jnp.concatenate([k, jnp.zeros((3, 5))], 0))
    np.testing.assert_allclose(got, np.asarray(sym), atol=1e-5)


def test_causal_unideep_fsmn_formula_and_causality():
    x = _rand(10, (2, 9, 4))
    layer = CausalUniDeepFsmn(hidden_size=6, lorder=3)
    v = layer.init(jax.random.key(11), x)
    prm = jax.tree.map(np.asarray, v["params"])
    xn = np.asarray(x)
    p = (
        np.maximum(xn @ prm["linear"]["kernel"] + prm["linear"]["bias"], 0)
        @ prm["project"]["kernel"]
    )
    want = xn + p + np.asarray(causal_fsmn_memory(jnp.asarray(p), prm["memory"]))
    y = layer.apply(v, x)
    np.testing.assert_allclose(y, want, atol=1e-5)
    y2 = layer.apply(v, x.at[:, 6].add(1.0))
    np.testing.assert_allclose(y2[:, :6], y[:, :6], atol=1e-6)
    assert not np.allclose(y2[:, 6:], y[:, 6:])


def test_complex_fsmn_along_frequency_pairs_and_is_frequency_causal():
    x = _rand(12, (2, 7, 3, 4, 2))
    layer = ComplexUniDeepFsmnFreq(hidden_size=5, lorder=3)
    v = layer.init(jax.random.key(13), x)
    real = CausalUniDeepFsmn(5, 3)

    def f(name, part):  # sequences over frequency: [B·T, F, C]
        seq = jnp.transpose(x[..., part], (0, 2, 1, 3)).reshape(6, 7, 4)
        out = real.apply({"params": v["params"][name]}, seq)
        return jnp.transpose(out.reshape(2, 3, 7, 4), (0, 2, 1, 3))

    y = layer.apply(v, x)
    np.testing.assert_allclose(y[..., 0], f("fsmn_re", 0) - f("fsmn_im", 1), atol=1e-5)
    np.testing.assert_allclose(y[..., 1], f("fsmn_re", 1) + f("fsmn_im", 0), atol=1e-5)
    y2 = layer.apply(v, x.at[:, 5, 1].add(1.0))  # one bin of one frame
    np.testing.assert_allclose(y2[:, :5], y[:, :5], atol=1e-6)  # lower bins unchanged
    np.testing.assert_allclose(y2[:, :, 0], y[:, :, 0], atol=1e-6)  # other frames unchanged
    assert not np.allclose(y2[:, 5:, 1], y[:, 5:, 1])


def test_bottleneck_complex_fsmn_is_time_causal_with_two_layers():
    x = _rand(14, (2, 2, 8, 3, 2))
    layer = ComplexUniDeepFsmn(hidden_size=5, lorder=3)
    v = layer.init(jax.random.key(15), x)
    assert set(v["params"]) == {"fsmn_re_l1", "fsmn_im_l1", "fsmn_re_l2", "fsmn_im_l2"}
    assert v["params"]["fsmn_re_l1"]["memory"].shape == (3, 6)  # C·F features
    y = layer.apply(v, x)
    y2 = layer.apply(v, x.at[:, :, 5].add(1.0))
    np.testing.assert_allclose(y2[:, :, :5], y[:, :, :5], atol=1e-6)
    assert not np.allclose(y2[:, :, 5:], y[:, :, 5:])


def test_complex_se_matches_the_official_gates():
    x = _rand(16, (2, 5, 4, 8, 2))
    se = ComplexSE(reduction=4)
    v = se.init(jax.random.key(17), x)
    prm = jax.tree.map(np.asarray, v["params"])

    def fc(name, z):
        h = np.maximum(z @ prm[f"{name}_0"]["kernel"] + prm[f"{name}_0"]["bias"], 0)
        return 1 / (1 + np.exp(-(h @ prm[f"{name}_2"]["kernel"] + prm[f"{name}_2"]["bias"])))

    m = np.asarray(x).mean((1, 2))  # [B, C, 2]
    g_re = fc("fc_r", m[..., 0]) - fc("fc_i", m[..., 1])
    g_im = fc("fc_r", m[..., 1]) + fc("fc_i", m[..., 0])
    y = se.apply(v, x)
    np.testing.assert_allclose(y[..., 0], x[..., 0] * g_re[:, None, None], atol=1e-5)
    np.testing.assert_allclose(y[..., 1], x[..., 1] * g_im[:, None, None], atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"x must be \[B, L\].*\(2, 100\)"):
        conv_stft(jnp.ones((2, 100)), 128, 64, 128)
    with pytest.raises(ValueError, match="win_len .* must be <= fft_len"):
        stft_kernels(256, 64, 128)
    with pytest.raises(ValueError, match="window must be one of"):
        stft_window(16, "kaiser")
    with pytest.raises(ValueError, match=r"spec must be \[B, F=33, T, 2\]"):
        conv_istft(jnp.ones((1, 32, 4, 2)), 64, 32, 64)
    x = jnp.ones((1, 5, 4, 3))
    with pytest.raises(ValueError, match=r"ComplexConv2d: x must be a complex feature map"):
        ComplexConv2d(2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="ComplexConvTranspose2d: need padding"):
        ComplexConvTranspose2d(2, (2, 2), padding=(2, 0)).init(
            jax.random.key(0), jnp.ones((1, 3, 3, 2, 2)))  # fmt: skip
    with pytest.raises(ValueError, match="channels 4 // reduction 8"):
        ComplexSE(8).init(jax.random.key(0), jnp.ones((1, 3, 3, 4, 2)))
    with pytest.raises(ValueError, match="lorder must be an int >= 1"):
        CausalUniDeepFsmn(4, 0).init(jax.random.key(0), jnp.ones((1, 3, 2)))


@pytest.mark.torch
def test_matches_official_conv_stft_rebuilt_in_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    win, hop, fft = 64, 32, 64
    # The official init_kernels: scipy periodic 'hann' ** 0.5, rfft basis, pinv for the inverse.
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)) ** 0.5
    basis = np.fft.rfft(np.eye(fft))[:win]
    kernel = np.concatenate([basis.real, basis.imag], 1).T
    fwd = torch.tensor((kernel * window)[:, None, :], dtype=torch.float32)
    inv = torch.tensor((np.linalg.pinv(kernel).T * window)[:, None, :], dtype=torch.float32)
    x = np.asarray(_rand(18, (2, 400)), np.float32)
    spec_t = F.conv1d(torch.tensor(x)[:, None], fwd, stride=hop)  # [B, 2F, T]
    out_t = F.conv_transpose1d(spec_t, inv, stride=hop)
    t = torch.tensor(window[None, :, None] ** 2, dtype=torch.float32).repeat(1, 1, spec_t.shape[-1])
    coff = F.conv_transpose1d(t, torch.eye(win)[:, None, :], stride=hop)
    out_t = (out_t / (coff + 1e-8))[:, 0].numpy()
    spec = np.asarray(conv_stft(jnp.asarray(x), win, hop, fft))  # [B, F, T, 2]
    got = np.concatenate([spec[..., 0], spec[..., 1]], 1)
    np.testing.assert_allclose(got, spec_t.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(conv_istft(jnp.asarray(spec), win, hop, fft)), out_t,
                               atol=1e-3)  # fmt: skip
