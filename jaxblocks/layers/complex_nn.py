"""Complex-valued layers of DCCRN / FRCRN — Zhao et al., "FRCRN: Boosting Feature Representation
using Frequency Recurrence for Monaural Speech Enhancement", ICASSP 2022,
https://arxiv.org/abs/2206.07293 (official code: modelscope/ClearerVoice-Studio
``clearvoice/models/frcrn_se/{conv_stft,complex_nn,se_layer}.py``, from the modelscope
``models/audio/ans`` original).

A complex tensor is stored as a real array with a trailing axis of 2, ``(real, imag)``; feature
maps are channels-last ``[B, F, T, C, 2]`` (frequency, time, channels), where the official
modules use ``[B, C, F, T, 2]``. Every complex layer is the official "two real layers" form:
a complex convolution with ``W = W_re + i·W_im`` computes ``W_re * x_re − W_im * x_im`` and
``W_re * x_im + W_im * x_re`` (each real layer with its own bias, as the official); the real
and imaginary halves share one call of each real layer by folding them into the batch.

- `ConvSTFT` / `ConviSTFT` (official ``ConvSTFT`` / ``ConviSTFT``): framing by a strided
  convolution with fixed DFT kernels (no centring, no padding: ``T = ⌊(L − win) / hop⌋ + 1``
  frames), a periodic window raised to the power 1/2 (FRCRN: ``'hanning'`` → sqrt-Hann), the
  inverse kernel the pseudo-inverse of the forward DFT basis times the window, overlap-add
  divided by the overlap-added squared window (``+ 1e-8``). Reconstruction is exact wherever
  the squared windows overlap-add to a non-zero value (every sample but the first of a
  sqrt-Hann STFT, up to the end of the last frame).
- `ComplexConv2d`, `ComplexConvTranspose2d` (torch padding semantics: the transposed
  convolution's full output cropped by ``padding`` on both sides), `ComplexBatchNorm` (the
  official one is the *naive* form, two independent real BatchNorms on the real and the
  imaginary parts, not Trabelsi et al.'s covariance whitening; it is followed here).
- `CausalUniDeepFsmn` (FRCRN's ``UniDeepFsmn``: unlike MossFormer2's, its memory filter is
  *causal*, ``lorder`` taps on the current and past positions), `ComplexUniDeepFsmnFreq`
  (official ``ComplexUniDeepFsmn_L1``: run along the *frequency* axis, the "frequency
  recurrence") and `ComplexUniDeepFsmn` (two layers along time over the flattened channels and
  frequencies, the U-Net bottleneck).
- `ComplexSE` (official ``SELayer``): squeeze-excitation whose real and imaginary gates are
  ``fc_r(x̄_re) − fc_i(x̄_im)`` and ``fc_r(x̄_im) + fc_i(x̄_re)`` (each ``fc`` ends in a
  sigmoid), applied *element-wise* per part (the official multiplies ``x * cat([y_r, y_i])``,
  not a complex product).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.layers.fsmn import UniDeepFsmn, causal_fsmn_memory
from jaxblocks.typing import Array, Float

__all__ = [
    "ComplexBatchNorm",
    "ComplexConv2d",
    "ComplexConvTranspose2d",
    "ComplexSE",
    "ComplexUniDeepFsmn",
    "ComplexUniDeepFsmnFreq",
    "CausalUniDeepFsmn",
    "ConvSTFT",
    "ConviSTFT",
    "causal_fsmn_memory",
    "complex_multiply",
    "conv_istft",
    "conv_stft",
    "stft_kernels",
    "stft_window",
]

WINDOWS = ("hann", "hanning", "hamming", "none")


def stft_window(win_len: int, window: str | None = "hann") -> np.ndarray:
    """The official analysis/synthesis window: scipy's *periodic* ``get_window(window,
    win_len)`` raised to the power 1/2 (``'hanning'`` is the Hann window; None or ``'none'``:
    rectangular, not square-rooted, as the official)."""
    if window is None or window == "none":
        return np.ones(win_len)
    if window not in WINDOWS:
        raise ValueError(f"stft_window: window must be one of {WINDOWS} or None, got {window!r}")
    n = np.arange(win_len)
    a = 0.54 if window == "hamming" else 0.5
    return np.sqrt(a - (1 - a) * np.cos(2 * np.pi * n / win_len))


def _check_stft_args(layer: str, win_len: int, hop_len: int, fft_len: int) -> None:
    for name, v in (("win_len", win_len), ("hop_len", hop_len), ("fft_len", fft_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{layer}: {name} must be an int >= 1, got {v!r}")
    if win_len > fft_len:
        raise ValueError(f"{layer}: win_len ({win_len}) must be <= fft_len ({fft_len})")
    if hop_len > win_len:
        raise ValueError(f"{layer}: hop_len ({hop_len}) must be <= win_len ({win_len})")


def stft_kernels(
    win_len: int, hop_len: int, fft_len: int, window: str | None = "hann"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(forward [win_len, 2F], inverse [2F, win_len], window [win_len])`` in float64, ``F =
    fft_len // 2 + 1``, as the official ``init_kernels``: the forward kernel maps a frame to
    ``[Re X_0..Re X_{F−1}, Im X_0..Im X_{F−1}]`` (the rfft basis of the first ``win_len`` unit
    vectors of an ``fft_len``-point DFT, windowed); the inverse is the pseudo-inverse of the
    unwindowed basis, windowed once more, so a frame comes back multiplied by the squared
    window."""
    _check_stft_args("stft_kernels", win_len, hop_len, fft_len)
    win = stft_window(win_len, window)
    basis = np.fft.rfft(np.eye(fft_len))[:win_len]  # [win, F] complex
    kernel = np.concatenate([basis.real, basis.imag], axis=1).T  # [2F, win]
    inverse = np.linalg.pinv(kernel).T * win  # [2F, win]
    return (kernel * win).T, inverse, win


def _frames(length: int, win_len: int, hop_len: int) -> int:
    return (length - win_len) // hop_len + 1


def conv_stft(
    x: Float[Array, "B L"], win_len: int, hop_len: int, fft_len: int, window: str | None = "hann"
) -> Float[Array, "B F T 2"]:
    """Complex STFT ``[B, F, T, 2]`` of waveforms ``[B, L]`` by a strided convolution with the
    fixed `stft_kernels` (official ``ConvSTFT(feature_type='complex')``, no centring); computed
    in fp32 at the highest matmul precision whatever the input dtype."""
    _check_stft_args("conv_stft", win_len, hop_len, fft_len)
    if x.ndim != 2 or x.shape[1] < win_len:
        raise ValueError(f"conv_stft: x must be [B, L] waveforms with L >= win_len = {win_len}, "
                         f"got shape {x.shape}")  # fmt: skip
    fwd = stft_kernels(win_len, hop_len, fft_len, window)[0]
    n_bins = fft_len // 2 + 1
    spec = jax.lax.conv_general_dilated(
        x.astype(jnp.float32)[..., None],  # [B, L, 1]
        jnp.asarray(fwd[:, None, :], jnp.float32),  # [win, 1, 2F]
        window_strides=(hop_len,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # [B, T, 2F]
    spec = spec.reshape(spec.shape[0], spec.shape[1], 2, n_bins)  # [B, T, 2, F]
    return jnp.transpose(spec, (0, 3, 1, 2))


def conv_istft(
    spec: Float[Array, "B F T 2"],
    win_len: int,
    hop_len: int,
    fft_len: int,
    window: str | None = "hann",
) -> Float[Array, "B M"]:
    """Waveforms ``[B, (T − 1)·hop + win]`` from a complex spectrum ``[B, F, T, 2]`` (official
    ``ConviSTFT``: transposed convolution with the inverse kernel, divided by the overlap-added
    squared window + 1e-8); fp32, highest precision."""
    _check_stft_args("conv_istft", win_len, hop_len, fft_len)
    n_bins = fft_len // 2 + 1
    if spec.ndim != 4 or spec.shape[1] != n_bins or spec.shape[3] != 2:
        raise ValueError(f"conv_istft: spec must be [B, F={n_bins}, T, 2] for fft_len "
                         f"{fft_len}, got shape {spec.shape}")  # fmt: skip
    _, inv, win = stft_kernels(win_len, hop_len, fft_len, window)
    b, _, t, _ = spec.shape
    s = jnp.transpose(spec.astype(jnp.float32), (0, 2, 3, 1)).reshape(b, t, 2 * n_bins)
    frames = jnp.einsum(
        "btk,kw->btw", s, jnp.asarray(inv, jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # [B, T, win]
    idx = (np.arange(t)[:, None] * hop_len + np.arange(win_len)[None, :]).reshape(-1)
    length = (t - 1) * hop_len + win_len
    out = jnp.zeros((b, length), jnp.float32).at[:, idx].add(frames.reshape(b, -1))
    coff = np.zeros(length)
    np.add.at(coff, idx, np.tile(win**2, t))
    return out / jnp.asarray(coff + 1e-8, jnp.float32)[None]


class ConvSTFT(nn.Module):
    """FRCRN's fixed-kernel STFT (https://arxiv.org/abs/2206.07293): waveforms ``[B, L]`` →
    complex spectra ``[B, F, T, 2]`` (see `conv_stft`). The official kernels are
    ``nn.Parameter(requires_grad=False)``; here they are constants.

    Attributes:
      win_len, hop_len, fft_len: official FRCRN_SE_16K 640 / 320 / 640 (16 kHz).
      window: ``'hann'`` (official ``'hanning'``, square-rooted), ``'hamming'`` or None.

    Example:
      >>> stft = ConvSTFT(64, 32, 64)
      >>> stft.apply({}, jnp.ones((2, 256))).shape
      (2, 33, 7, 2)
    """

    win_len: int = 640
    hop_len: int = 320
    fft_len: int = 640
    window: str | None = "hann"

    def __call__(self, x: Float[Array, "B L"]) -> Float[Array, "B F T 2"]:
        return conv_stft(x, self.win_len, self.hop_len, self.fft_len, self.window)


class ConviSTFT(nn.Module):
    """FRCRN's fixed-kernel inverse STFT (https://arxiv.org/abs/2206.07293): complex spectra
    ``[B, F, T, 2]`` → waveforms ``[B, (T − 1)·hop + win]`` (see `conv_istft`).

    Attributes:
      win_len, hop_len, fft_len, window: as `ConvSTFT`.

    Example:
      >>> istft = ConviSTFT(64, 32, 64)
      >>> istft.apply({}, jnp.ones((2, 33, 7, 2))).shape
      (2, 256)
    """

    win_len: int = 640
    hop_len: int = 320
    fft_len: int = 640
    window: str | None = "hann"

    def __call__(self, spec: Float[Array, "B F T 2"]) -> Float[Array, "B M"]:
        return conv_istft(spec, self.win_len, self.hop_len, self.fft_len, self.window)


def complex_multiply(a: Array, b: Array) -> Array:
    """``a · b`` for complex tensors stored as ``[..., 2]`` (real, imag)."""
    re = a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1]
    im = a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]
    return jnp.stack([re, im], axis=-1)


def _check_complex(layer: str, x: Array, ndim: int = 5) -> None:
    if x.ndim != ndim or x.shape[-1] != 2:
        want = "[B, F, T, C, 2]" if ndim == 5 else f"{ndim}-D [..., 2]"
        raise ValueError(f"{layer}: x must be a complex feature map {want} (real, imag last), "
                         f"got shape {x.shape}")  # fmt: skip


def _fold(x: Array) -> Array:
    """``[B, ..., 2]`` → ``[2B, ...]``: real parts, then imaginary parts, in the batch."""
    return jnp.concatenate([x[..., 0], x[..., 1]], axis=0)


def _complex_apply(layer_re, layer_im, x: Array) -> Array:
    """``layer_re(x_re) − layer_im(x_im) + i·(layer_re(x_im) + layer_im(x_re))`` with one call
    of each real layer (official complex pairing)."""
    b = x.shape[0]
    xs = _fold(x)
    a, c = layer_re(xs), layer_im(xs)
    return jnp.stack([a[:b] - c[b:], a[b:] + c[:b]], axis=-1)


def _pairs(v, name: str, layer: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"{layer}: {name} must be an int or a pair of ints >= 0, got {v!r}")
    return t


class ComplexConv2d(nn.Module):
    """FRCRN complex 2-D convolution (https://arxiv.org/abs/2206.07293; DCCRN's
    ``ComplexConv2d``): two real convolutions ``conv_re``, ``conv_im`` (each with a bias),
    ``y = (W_re * x_re − W_im * x_im) + i·(W_re * x_im + W_im * x_re)``; zero padding
    ``padding`` on both sides of each spatial axis (torch semantics).

    Attributes:
      features: output channels.
      kernel_size, strides, padding: ints or (freq, time) pairs.
      use_bias: each real convolution's bias (official True).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> conv = ComplexConv2d(4, (5, 2), strides=(2, 1), padding=(0, 1))
      >>> x = jnp.ones((1, 9, 6, 3, 2))
      >>> conv.apply(conv.init(jax.random.key(0), x), x).shape
      (1, 3, 7, 4, 2)
    """

    features: int
    kernel_size: Any = (1, 1)
    strides: Any = (1, 1)
    padding: Any = (0, 0)
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"]) -> Float[Array, "B F2 T2 D 2"]:
        _check_complex("ComplexConv2d", x)
        k = _pairs(self.kernel_size, "kernel_size", "ComplexConv2d")
        s = _pairs(self.strides, "strides", "ComplexConv2d")
        p = _pairs(self.padding, "padding", "ComplexConv2d")
        conv = dict(features=self.features, kernel_size=k, strides=s,
                    padding=[(p[0], p[0]), (p[1], p[1])], use_bias=self.use_bias,
                    dtype=self.dtype or x.dtype, param_dtype=self.param_dtype)  # fmt: skip
        return _complex_apply(nn.Conv(name="conv_re", **conv), nn.Conv(name="conv_im", **conv), x)


def conv_transpose_2d(
    x: Float[Array, "N H W C"],
    kernel: Float[Array, "KH KW C D"],
    strides: tuple[int, int],
    padding: tuple[int, int],
) -> Float[Array, "N H2 W2 D"]:
    """torch ``conv_transpose2d`` on channels-last input: ``y[s·i + k − p] += x[i]·kernel[k]``
    per spatial axis, output ``(in − 1)·s − 2p + k`` (kernel ``[KH, KW, in, out]``, the
    transpose of torch's ``[in, out, KH, KW]``; needs ``k >= s``).

    Computed by phases (polyphase): the outputs ``s·i + r`` are a stride-1 "full" convolution
    of ``x`` with the kernel taps ``r, r + s, …``, interleaved. XLA:CPU runs (and
    differentiates) the input-dilated convolution of the textbook form an order of magnitude
    slower."""
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    n, h, w = x.shape[:3]
    full_h, full_w = (h - 1) * sh + kh, (w - 1) * sw + kw
    len_h, len_w = h - 1 + -(-kh // sh), w - 1 + -(-kw // sw)
    rows = []
    for rh in range(sh):
        cols = []
        for rw in range(sw):
            sub = kernel[rh::sh, rw::sw]  # [nh, nw, C, D]
            nh, nw = sub.shape[:2]
            y = jax.lax.conv_general_dilated(
                x,
                sub[::-1, ::-1],
                window_strides=(1, 1),
                padding=[(nh - 1, nh - 1), (nw - 1, nw - 1)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # [N, h + nh − 1, w + nw − 1, D]: outputs s·i + r
            cols.append(jnp.pad(y, ((0, 0), (0, len_h - y.shape[1]), (0, len_w - y.shape[2]),
                                    (0, 0))))  # fmt: skip
        rows.append(jnp.stack(cols, axis=3))  # [N, len_h, len_w, sw, D]
    y = jnp.stack(rows, axis=2)  # [N, len_h, sh, len_w, sw, D]
    y = y.reshape(n, len_h * sh, len_w * sw, -1)[:, :full_h, :full_w]
    ph, pw = padding
    return y[:, ph : full_h - ph, pw : full_w - pw]


class ComplexConvTranspose2d(nn.Module):
    """FRCRN complex 2-D transposed convolution (https://arxiv.org/abs/2206.07293): two real
    torch-style transposed convolutions ``tconv_re``, ``tconv_im`` paired as in
    `ComplexConv2d`; output size ``(in − 1)·stride − 2·padding + kernel`` per axis.

    Attributes:
      features: output channels.
      kernel_size, strides, padding: ints or (freq, time) pairs (torch semantics: the full
        output cropped by ``padding`` on both sides; ``padding < kernel_size``).
      use_bias: official True.
      kernel_init: Flax's default convolution initialiser (the official keeps torch's).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> tconv = ComplexConvTranspose2d(2, (5, 2), strides=(2, 1), padding=(0, 1))
      >>> x = jnp.ones((1, 3, 7, 4, 2))
      >>> tconv.apply(tconv.init(jax.random.key(0), x), x).shape
      (1, 9, 6, 2, 2)
    """

    features: int
    kernel_size: Any = (1, 1)
    strides: Any = (1, 1)
    padding: Any = (0, 0)
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"]) -> Float[Array, "B F2 T2 D 2"]:
        _check_complex("ComplexConvTranspose2d", x)
        k = _pairs(self.kernel_size, "kernel_size", "ComplexConvTranspose2d")
        s = _pairs(self.strides, "strides", "ComplexConvTranspose2d")
        p = _pairs(self.padding, "padding", "ComplexConvTranspose2d")
        if p[0] >= k[0] or p[1] >= k[1] or not 1 <= s[0] <= k[0] or not 1 <= s[1] <= k[1]:
            raise ValueError(f"ComplexConvTranspose2d: need padding {p} < kernel_size {k} and "
                             f"1 <= strides {s} <= kernel_size")  # fmt: skip
        dtype = self.dtype or x.dtype
        shape = k + (x.shape[-2], self.features)
        layers = []
        for name in ("tconv_re", "tconv_im"):
            w = self.param(f"{name}_kernel", self.kernel_init, shape, self.param_dtype)
            bias = (self.param(f"{name}_bias", nn.initializers.zeros, (self.features,),
                               self.param_dtype) if self.use_bias else None)  # fmt: skip

            def layer(v, w=w, bias=bias):
                y = conv_transpose_2d(v, w.astype(dtype), s, p)
                return y if bias is None else y + bias.astype(dtype).reshape(1, 1, 1, -1)

            layers.append(layer)
        return _complex_apply(*layers, x.astype(dtype))


class ComplexBatchNorm(nn.Module):
    """FRCRN's complex BatchNorm (https://arxiv.org/abs/2206.07293; official
    ``ComplexBatchNorm2d``): two independent real BatchNorms ``bn_re`` / ``bn_im`` over the
    real and the imaginary parts (the naive form, not a covariance whitening), per channel over
    ``(B, F, T)``. Flax `nn.BatchNorm` semantics: ``momentum`` is the decay (torch's
    momentum 0.1 → 0.9), the running variance tracks the biased batch variance (torch tracks
    the unbiased one); statistics in fp32.

    Attributes:
      momentum: running-average decay (0.9).
      epsilon: 1e-5 (official).
      param_dtype: storage dtype.

    Example:
      >>> bn = ComplexBatchNorm()
      >>> x = jnp.ones((2, 5, 4, 3, 2))
      >>> bn.apply(bn.init(jax.random.key(0), x), x).shape
      (2, 5, 4, 3, 2)
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"], train: bool = False) -> Array:
        _check_complex("ComplexBatchNorm", x)
        bn = dict(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            use_fast_variance=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        re = nn.BatchNorm(name="bn_re", **bn)(xf[..., 0])
        im = nn.BatchNorm(name="bn_im", **bn)(xf[..., 1])
        return jnp.stack([re, im], axis=-1).astype(x.dtype)


class CausalUniDeepFsmn(UniDeepFsmn):
    """FRCRN's real FSMN layer (https://arxiv.org/abs/2206.07293; official ``UniDeepFsmn``):
    `jaxblocks.layers.fsmn.UniDeepFsmn` with ``causal=True``: ``p = W₂ ReLU(W₁x + b₁)``;
    ``out = x + p + causal_memory(p)``, a depthwise filter of ``lorder`` taps over the current
    and the ``lorder − 1`` previous positions (MossFormer2's `UniDeepFsmn` is symmetric).
    Layout ``[N, L, C]``, the sequence axis second.

    Attributes:
      hidden_size: ReLU projection width (official 128).
      lorder: memory taps (official 20).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> layer = CausalUniDeepFsmn(hidden_size=8, lorder=3)
      >>> x = jnp.ones((2, 10, 4))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 10, 4)
    """

    hidden_size: int = 128
    causal: bool = True


class ComplexUniDeepFsmnFreq(nn.Module):
    """FRCRN's frequency-recurrent complex FSMN (https://arxiv.org/abs/2206.07293; official
    ``ComplexUniDeepFsmn_L1``): for every frame, a complex `CausalUniDeepFsmn` pair
    (``fsmn_re``, ``fsmn_im``) runs along the *frequency* axis (low to high bins) over the
    channels: ``re = fsmn_re(x_re) − fsmn_im(x_im)``, ``im = fsmn_re(x_im) + fsmn_im(x_re)``.

    Attributes:
      hidden_size, lorder: of each real FSMN (official 128, 20).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> layer = ComplexUniDeepFsmnFreq(hidden_size=8, lorder=3)
      >>> x = jnp.ones((2, 9, 5, 4, 2))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 9, 5, 4, 2)
    """

    hidden_size: int = 128
    lorder: int = 20
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"]) -> Float[Array, "B F T C 2"]:
        _check_complex("ComplexUniDeepFsmnFreq", x)
        b, f, t, c, _ = x.shape
        kw = dict(hidden_size=self.hidden_size, lorder=self.lorder, dtype=self.dtype,
                  param_dtype=self.param_dtype)  # fmt: skip
        seq = jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b * t, f, c, 2)  # sequences over F
        y = _complex_apply(CausalUniDeepFsmn(name="fsmn_re", **kw),
                           CausalUniDeepFsmn(name="fsmn_im", **kw), seq)  # fmt: skip
        return jnp.transpose(y.reshape(b, t, f, c, 2), (0, 2, 1, 3, 4))


class ComplexUniDeepFsmn(nn.Module):
    """FRCRN's bottleneck complex FSMN (https://arxiv.org/abs/2206.07293; official
    ``ComplexUniDeepFsmn``): two complex `CausalUniDeepFsmn` layers (``fsmn_re_l1``,
    ``fsmn_im_l1``, then ``fsmn_re_l2``, ``fsmn_im_l2``) along *time*, over the channels and
    frequencies flattened channel-major (official ``c·h`` with ``h = 1`` at the bottleneck of
    FRCRN_SE_16K, so width 128).

    Attributes:
      hidden_size, lorder: of each real FSMN (official 128, 20).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> layer = ComplexUniDeepFsmn(hidden_size=8, lorder=3)
      >>> x = jnp.ones((2, 1, 5, 4, 2))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 1, 5, 4, 2)
    """

    hidden_size: int = 128
    lorder: int = 20
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"]) -> Float[Array, "B F T C 2"]:
        _check_complex("ComplexUniDeepFsmn", x)
        b, f, t, c, _ = x.shape
        kw = dict(hidden_size=self.hidden_size, lorder=self.lorder, dtype=self.dtype,
                  param_dtype=self.param_dtype)  # fmt: skip
        seq = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, t, c * f, 2)  # [B, T, C·F, 2]
        for layer in ("l1", "l2"):
            seq = _complex_apply(CausalUniDeepFsmn(name=f"fsmn_re_{layer}", **kw),
                                 CausalUniDeepFsmn(name=f"fsmn_im_{layer}", **kw), seq)  # fmt: skip
        return jnp.transpose(seq.reshape(b, t, c, f, 2), (0, 3, 1, 2, 4))


class ComplexSE(nn.Module):
    """FRCRN's complex squeeze-excitation (https://arxiv.org/abs/2206.07293; official
    ``SELayer``): ``x̄_re, x̄_im`` = means over (F, T); ``fc = sigmoid(W₂ ReLU(W₁·))`` for
    ``fc_r`` and ``fc_i`` (``C → C // reduction → C``, biases); gates ``g_re = fc_r(x̄_re) −
    fc_i(x̄_im)``, ``g_im = fc_r(x̄_im) + fc_i(x̄_re)``; output ``(x_re·g_re, x_im·g_im)``
    (element-wise per part, as the official).

    Attributes:
      reduction: official 8.
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> se = ComplexSE(reduction=2)
      >>> x = jnp.ones((2, 5, 4, 4, 2))
      >>> se.apply(se.init(jax.random.key(0), x), x).shape
      (2, 5, 4, 4, 2)
    """

    reduction: int = 8
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B F T C 2"]) -> Float[Array, "B F T C 2"]:
        _check_complex("ComplexSE", x)
        c = x.shape[-2]
        if c // self.reduction < 1:
            raise ValueError(f"ComplexSE: channels {c} // reduction {self.reduction} must be "
                             ">= 1")  # fmt: skip
        dtype = self.dtype or x.dtype
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)  # [B, C, 2]

        def fc(name):
            down = nn.Dense(c // self.reduction, name=f"{name}_0", **kw)
            up = nn.Dense(c, name=f"{name}_2", **kw)
            return lambda v: nn.sigmoid(up(nn.relu(down(v))))

        fc_r, fc_i = fc("fc_r"), fc("fc_i")
        g_re = fc_r(pooled[..., 0]) - fc_i(pooled[..., 1])
        g_im = fc_r(pooled[..., 1]) + fc_i(pooled[..., 0])
        gate = jnp.stack([g_re, g_im], axis=-1)[:, None, None]  # [B, 1, 1, C, 2]
        return x.astype(dtype) * gate
