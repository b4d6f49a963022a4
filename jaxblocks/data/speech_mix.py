"""Synthetic two-speaker mixtures for separation demos (nothing is downloaded).

Each "speaker" is a voiced, speech-like signal: a harmonic tone whose fundamental follows a
random smooth pitch contour (80–300 Hz), harmonics weighted by a formant-like spectral envelope
(three Gaussian resonances at random frequencies) and a syllable-like amplitude envelope. The
sources are mixed at a random speaker-to-speaker ratio; everything is a pure function of the
seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["speech_mix", "speech_like"]


def speech_like(rng: np.random.Generator, length: int, sample_rate: int = 8000) -> np.ndarray:
    """One speech-like source ``[length]`` (float64, unit RMS)."""
    t = np.arange(length) / sample_rate
    f0 = rng.uniform(80.0, 300.0)
    # smooth contour: a slow random sinusoid plus a linear glide, ±20 %
    contour = 1.0 + 0.12 * np.sin(2 * np.pi * rng.uniform(1.0, 6.0) * t + rng.uniform(0, 6.3))
    contour += rng.uniform(-0.08, 0.08) * t / max(t[-1], 1e-9)
    phase = 2 * np.pi * np.cumsum(f0 * contour) / sample_rate
    formants = rng.uniform([300, 900, 2200], [900, 2200, 3500])
    widths = rng.uniform(80, 250, size=3)
    out = np.zeros(length)
    for h in range(1, int(0.5 * sample_rate / (f0 * 1.25))):
        fh = h * f0
        amp = sum(np.exp(-0.5 * ((fh - f) / w) ** 2) for f, w in zip(formants, widths, strict=True))
        out += (amp + 0.02) * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    rate = rng.uniform(3.0, 8.0)  # syllables per second
    env = 0.6 + 0.4 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    out = out * env
    return out / max(np.sqrt(np.mean(out**2)), 1e-9)


def speech_mix(
    num: int,
    length: int,
    *,
    num_speakers: int = 2,
    snr_db: float = 5.0,
    seed: int = 0,
    sample_rate: int = 8000,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` mixtures: ``x`` ``[num, length]`` (float32) and ``y`` ``[num, length, S + 1]``
    (the sources, then the mixture as the last channel, for the SI-SDR improvement).

    Speaker ``i > 0`` is scaled to a random level in ``[−snr_db, snr_db]`` dB against speaker 0;
    each mixture is scaled to peak 0.9.
    """
    if num < 1 or length < 1 or num_speakers < 1:
        raise ValueError(f"speech_mix: num, length and num_speakers must be >= 1, got "
                         f"{num}, {length}, {num_speakers}")  # fmt: skip
    rng = np.random.default_rng(seed)
    y = np.zeros((num, length, num_speakers + 1))
    for n in range(num):
        for s in range(num_speakers):
            gain = 1.0 if s == 0 else 10 ** (rng.uniform(-snr_db, snr_db) / 20)
            y[n, :, s] = gain * speech_like(rng, length, sample_rate)
        mix = y[n, :, :num_speakers].sum(-1)
        scale = 0.9 / max(np.abs(mix).max(), 1e-9)
        y[n, :, :num_speakers] *= scale
        y[n, :, -1] = mix * scale
    return y[..., -1].astype(np.float32), y.astype(np.float32)
