"""Synthetic noisy speech for enhancement demos (nothing is downloaded).

The clean signal is one speech-like "speaker" of `jaxblocks.data.speech_mix` (a harmonic tone
with a random pitch contour, formant envelope and syllable-like amplitude); the noise is one of
three kinds, drawn per example:

- ``white``: Gaussian white noise;
- ``pink``: Gaussian noise shaped to a 1/f power spectrum (amplitude ∝ 1/√f in the rFFT);
- ``babble``: the sum of 3–6 other speech-like speakers at random levels (babble-like).

The noise is scaled to a random SNR in ``snr_range`` dB against the clean signal, and each pair
is scaled to a noisy peak of 0.9; everything is a pure function of the seed.
"""

from __future__ import annotations

import numpy as np

from jaxblocks.data.speech_mix import speech_like

__all__ = ["NOISE_KINDS", "noise", "speech_noise"]

NOISE_KINDS = ("white", "pink", "babble")


def noise(rng: np.random.Generator, kind: str, length: int, sample_rate: int = 8000) -> np.ndarray:
    """One noise signal ``[length]`` (float64, unit RMS) of ``kind`` (`NOISE_KINDS`)."""
    if kind == "white":
        out = rng.standard_normal(length)
    elif kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(length))
        f = np.arange(spec.shape[0], dtype=np.float64)
        spec = spec / np.sqrt(np.maximum(f, 1.0))
        spec[0] = 0.0
        out = np.fft.irfft(spec, n=length)
    elif kind == "babble":
        n = int(rng.integers(3, 7))
        out = sum(10 ** (rng.uniform(-6, 0) / 20) * speech_like(rng, length, sample_rate)
                  for _ in range(n))  # fmt: skip
    else:
        raise ValueError(f"noise: kind must be one of {NOISE_KINDS}, got {kind!r}")
    return out / max(np.sqrt(np.mean(out**2)), 1e-12)


def speech_noise(
    num: int,
    length: int,
    *,
    snr_range: tuple[float, float] = (-5.0, 10.0),
    kinds: tuple[str, ...] = NOISE_KINDS,
    seed: int = 0,
    sample_rate: int = 8000,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` (noisy, clean) pairs: ``x`` ``[num, length]`` (the noisy input, float32) and ``y``
    ``[num, length, 2]`` (the clean speech, then the noisy input again, for the improvement
    metrics of the ``enhancement`` task).

    Each example draws a noise kind from ``kinds`` and an SNR uniformly in ``snr_range`` dB.
    """
    if num < 1 or length < 1:
        raise ValueError(f"speech_noise: num and length must be >= 1, got {num}, {length}")
    lo, hi = snr_range
    if not lo <= hi:
        raise ValueError(f"speech_noise: snr_range must be (low, high) with low <= high, got "
                         f"{snr_range}")  # fmt: skip
    if not kinds or any(k not in NOISE_KINDS for k in kinds):
        raise ValueError(f"speech_noise: kinds must be a non-empty subset of {NOISE_KINDS}, got "
                         f"{kinds}")  # fmt: skip
    rng = np.random.default_rng(seed)
    y = np.zeros((num, length, 2))
    for n in range(num):
        clean = speech_like(rng, length, sample_rate)  # unit RMS
        kind = kinds[int(rng.integers(len(kinds)))]
        snr = rng.uniform(lo, hi)
        noisy = clean + 10 ** (-snr / 20) * noise(rng, kind, length, sample_rate)
        scale = 0.9 / max(np.abs(noisy).max(), 1e-9)
        y[n, :, 0] = clean * scale
        y[n, :, 1] = noisy * scale
    return y[..., 1].astype(np.float32), y.astype(np.float32)
