"""FRCRN: U-Net layout, bounded cIRM, official parameter count, the enhancement task and the
speech_noise data; the official DCCRN/UNet rebuilt in torch on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.frcrn import unet_frequency_sizes
from jaxblocks.data.speech_noise import speech_noise
from jaxblocks.models.frcrn import FRCRN, FRCRNConfig, frcrn_variables_from_torch
from jaxblocks.registry import create_model
from jaxblocks.train.tasks import get_task, si_sdr

TINY = dict(win_len=64, hop_len=32, fft_len=64, channels=8, num_levels=3, fsmn_hidden=8,
            lorder=3, se_reduction=4)  # fmt: skip


def _n_params(model, x):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def test_official_unet_layout_at_321_bins():
    sizes, enc, dec = unet_frequency_sizes(321, 7)
    assert sizes == [321, 159, 78, 37, 17, 7, 2, 1]
    assert enc == [5, 5, 5, 5, 5, 5, 2]
    assert dec == [2, 5, 5, 5, 6, 5, 5]  # the official dec_kernel_sizes (freq)


def test_official_parameter_count_and_unused_modules():
    x = jnp.zeros((1, 1280))
    assert _n_params(create_model("frcrn"), x) == 13_141_844
    # The four never-called official modules per U-Net: 2 × (70,912 + 70,912 + 8,480 + 8,480).
    assert _n_params(create_model("frcrn", official_unused=False), x) == 13_141_844 - 317_568


def test_output_shape_mask_bound_and_train_mode():
    model = FRCRN(**TINY)
    x = 3.0 * jax.random.normal(jax.random.key(0), (2, 300))
    v = model.init(jax.random.key(1), x)
    y, mask = model.apply(v, x, return_mask=True)
    assert y.shape == (2, 300) and mask.shape == (2, 33, 8, 2)
    # cIRM = tanh(u1) + tanh(u2): each part within [-2, 2], and not trivially small.
    m = np.asarray(mask)
    assert np.abs(m).max() <= 2.0 and np.abs(m).max() > 0.05  # (fp32 tanh rounds to 1)
    # the output is the masked spectrum's iSTFT: zero past the last frame ((8-1)·32 + 64 = 288)
    np.testing.assert_array_equal(np.asarray(y)[:, 288:], 0.0)
    yt, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert np.isfinite(np.asarray(yt)).all()
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), v["batch_stats"],
                           upd["batch_stats"])  # fmt: skip
    assert all(jax.tree.leaves(changed))


def test_bad_inputs_raise_clear_errors():
    model = FRCRN(**TINY)
    with pytest.raises(ValueError, match=r"noisy must be \[B, L\] waveforms, got shape \(300,\)"):
        model.init(jax.random.key(0), jnp.ones((300,)))
    with pytest.raises(ValueError, match="at least win_len = 64 samples, got 40"):
        model.init(jax.random.key(0), jnp.ones((1, 40)))
    with pytest.raises(ValueError, match="33 frequency bins are too few for 5 levels"):
        FRCRNConfig(**{**TINY, "num_levels": 5})
    with pytest.raises(ValueError, match="FRCRNConfig.channels must be an int >= 1"):
        FRCRNConfig(channels=0)


def test_enhancement_task_metrics():
    x, y = speech_noise(3, 512, seed=1)
    task = get_task("enhancement")
    yj = jnp.asarray(y)
    perfect = task.metrics(yj[..., 0], yj)
    assert np.all(np.asarray(perfect["si_sdr"]) > 60)
    np.testing.assert_allclose(perfect["loss"], -perfect["si_sdr"])
    identity = task.metrics(jnp.asarray(x), yj)
    np.testing.assert_allclose(identity["si_sdri"], 0.0, atol=1e-3)
    np.testing.assert_allclose(identity["snri"], 0.0, atol=1e-3)
    halfway = task.metrics(0.5 * (yj[..., 0] + yj[..., 1]), yj)
    assert np.all(np.asarray(halfway["snri"]) > 5.0)  # half the noise: +6 dB
    with pytest.raises(ValueError, match=r"targets must be \[B, T, 2\]"):
        task.metrics(jnp.asarray(x), yj[..., :1])


def test_speech_noise_pairs_snr_and_determinism():
    x, y = speech_noise(12, 1000, seed=3)
    assert x.shape == (12, 1000) and y.shape == (12, 1000, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y[..., 1])
    clean, noise = y[..., 0].astype(np.float64), (y[..., 1] - y[..., 0]).astype(np.float64)
    snr = 10 * np.log10((clean**2).sum(1) / (noise**2).sum(1))
    assert snr.min() > -5.01 and snr.max() < 10.01 and snr.max() - snr.min() > 3
    np.testing.assert_allclose(np.abs(x).max(1), 0.9, rtol=1e-5)
    np.testing.assert_array_equal(speech_noise(12, 1000, seed=3)[0], x)
    assert not np.allclose(speech_noise(12, 1000, seed=4)[0], x)
    np.testing.assert_allclose(si_sdr(jnp.asarray(x), jnp.asarray(y[..., 0])), snr, atol=0.6)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        speech_noise(2, 100, kinds=("brown",))


def _official_torch_dccrn(torch, cfg: FRCRNConfig):
    """The official DCCRN / UNet(complex, depth 14) / complex_nn / SELayer re-expressed in torch
    for a configurable size (the official hard-codes the 321-bin layout; this uses the same
    per-level rules with `unet_frequency_sizes`)."""
    nn, F = torch.nn, torch.nn.functional

    class Fsmn(nn.Module):  # official UniDeepFsmn (causal memory)
        def __init__(self, dim, hidden, lorder):
            super().__init__()
            self.lorder = lorder
            self.linear = nn.Linear(dim, hidden)
            self.project = nn.Linear(hidden, dim, bias=False)
            self.conv1 = nn.Conv2d(dim, dim, [lorder, 1], groups=dim, bias=False)

        def forward(self, x):  # [N, L, C]
            p = self.project(F.relu(self.linear(x)))
            y = F.pad(p.unsqueeze(1).permute(0, 3, 2, 1), [0, 0, self.lorder - 1, 0])
            return (
                x + (p.unsqueeze(1).permute(0, 3, 2, 1) + self.conv1(y)).permute(0, 3, 2, 1)[:, 0]
            )

    def pair(a, b, x):
        return torch.stack([a(x[..., 0]) - b(x[..., 1]), a(x[..., 1]) + b(x[..., 0])], -1)

    class FsmnL1(nn.Module):  # official ComplexUniDeepFsmn_L1: along frequency
        def __init__(self):
            super().__init__()
            self.fsmn_re_L1 = Fsmn(cfg.channels, cfg.fsmn_hidden, cfg.lorder)
            self.fsmn_im_L1 = Fsmn(cfg.channels, cfg.fsmn_hidden, cfg.lorder)

        def forward(self, x):  # [b, c, h, T, 2]
            b, c, h, t, d = x.shape
            y = torch.transpose(x, 1, 3).reshape(b * t, h, c, d)
            y = pair(self.fsmn_re_L1, self.fsmn_im_L1, y)
            return torch.transpose(y.reshape(b, t, h, c, d), 1, 3)

    class FsmnBottleneck(nn.Module):  # official ComplexUniDeepFsmn: along time
        def __init__(self, width):
            super().__init__()
            for n in ("re_L1", "im_L1", "re_L2", "im_L2"):
                setattr(self, f"fsmn_{n}", Fsmn(width, cfg.fsmn_hidden, cfg.lorder))

        def forward(self, x):
            b, c, h, t, d = x.shape
            y = torch.transpose(x.reshape(b, c * h, t, d), 1, 2)
            y = pair(self.fsmn_re_L1, self.fsmn_im_L1, y)
            y = pair(self.fsmn_re_L2, self.fsmn_im_L2, y)
            return torch.transpose(y, 1, 2).reshape(b, c, h, t, d)

    class CConv(nn.Module):
        def __init__(self, cin, cout, k, s=1, p=0, transpose=False):
            super().__init__()
            mk = nn.ConvTranspose2d if transpose else nn.Conv2d
            self.names = ("tconv_re", "tconv_im") if transpose else ("conv_re", "conv_im")
            for n in self.names:
                setattr(self, n, mk(cin, cout, k, stride=s, padding=p))

        def forward(self, x):
            return pair(getattr(self, self.names[0]), getattr(self, self.names[1]), x)

    class CBN(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.bn_re, self.bn_im = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.stack([self.bn_re(x[..., 0]), self.bn_im(x[..., 1])], -1)

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            r = c // cfg.se_reduction
            self.fc_r = nn.Sequential(nn.Linear(c, r), nn.ReLU(), nn.Linear(r, c), nn.Sigmoid())
            self.fc_i = nn.Sequential(nn.Linear(c, r), nn.ReLU(), nn.Linear(r, c), nn.Sigmoid())

        def forward(self, x):
            b, c = x.shape[:2]
            xr, xi = x[..., 0].mean((2, 3)), x[..., 1].mean((2, 3))
            yr = (self.fc_r(xr) - self.fc_i(xi)).view(b, c, 1, 1, 1)
            yi = (self.fc_r(xi) + self.fc_i(xr)).view(b, c, 1, 1, 1)
            return x * torch.cat([yr, yi], 4)

    class Block(nn.Module):
        def __init__(self, cin, cout, k, transpose):
            super().__init__()
            conv = CConv(cin, cout, k, (2, 1), (0, 1), transpose)
            if transpose:
                self.transconv = conv
            else:
                self.conv = conv
            self.bn = CBN(cout)

        def forward(self, x):
            conv = self.transconv if hasattr(self, "transconv") else self.conv
            return F.leaky_relu(self.bn(conv(x)), 0.01)

    n_bins, levels, c = cfg.fft_len // 2 + 1, cfg.num_levels, cfg.channels
    sizes, enc_k, dec_k = unet_frequency_sizes(n_bins, levels)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fsmn = FsmnBottleneck(c * sizes[-1])
            for i in range(levels):
                setattr(self, f"fsmn_enc{i}", FsmnL1())
                setattr(self, f"encoder{i}", Block(1 if i == 0 else c, c, (enc_k[i], 2), False))
                setattr(self, f"se_layer_enc{i}", SE(c))
                setattr(self, f"fsmn_dec{i}", FsmnL1())
                out = c if i < levels - 1 else 1
                setattr(
                    self, f"decoder{i}", Block(c if i == 0 else 2 * c, out, (dec_k[i], 2), True)
                )
                if i < levels - 1:
                    setattr(self, f"se_layer_dec{i}", SE(c))
            self.linear = CConv(1, 1, 1)

        def forward(self, x):
            xs_se = [x]
            for i in range(levels):
                if i > 0:
                    x = getattr(self, f"fsmn_enc{i}")(x)
                x = getattr(self, f"encoder{i}")(x)
                xs_se.append(getattr(self, f"se_layer_enc{i}")(x))
            p = self.fsmn(x)
            for i in range(levels):
                p = getattr(self, f"decoder{i}")(p)
                if i == levels - 1:
                    break
                p = getattr(self, f"fsmn_dec{i}")(p)
                if i < levels - 2:
                    p = getattr(self, f"se_layer_dec{i}")(p)
                p = torch.cat([p, xs_se[levels - 1 - i]], 1)
            return self.linear(p)

    class DCCRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.unet2 = UNet(), UNet()

        def forward(self, spec):  # [B, 1, F, T, 2] -> mask
            u1 = self.unet(spec)
            return torch.tanh(self.unet2(u1)) + torch.tanh(u1)

    return DCCRN()


@pytest.mark.torch
def test_matches_official_dccrn_rebuilt_in_torch():
    torch = pytest.importorskip("torch")
    from jaxblocks.layers.complex_nn import complex_multiply, conv_istft, conv_stft

    cfg = FRCRNConfig(**TINY)
    torch.manual_seed(0)
    ref = _official_torch_dccrn(torch, cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics and affine terms
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    variables = frcrn_variables_from_torch(ref.state_dict())
    model = FRCRN(**TINY)
    x = 0.5 * jax.random.normal(jax.random.key(2), (2, 352))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)

    y, mask = model.apply(variables, x, return_mask=True)
    spec = np.asarray(conv_stft(x, 64, 32, 64))  # [B, F, T, 2]
    with torch.no_grad():
        want_mask = ref(torch.tensor(spec)[:, None]).numpy()[:, 0]  # [B, F, T, 2]
    np.testing.assert_allclose(np.asarray(mask), want_mask, atol=1e-4)
    want_y = conv_istft(complex_multiply(jnp.asarray(spec), jnp.asarray(want_mask)), 64, 32, 64)
    np.testing.assert_allclose(np.asarray(y)[:, : want_y.shape[1]], want_y, atol=1e-4)
