"""Synthetic spoken keywords for keyword-spotting demos (nothing is downloaded).

Ten "keywords" modelled loosely on the spoken digits: each is a fixed sequence of 2–4 phone-like
segments — vowels and nasals (harmonic tones of a speaker's pitch under three formant
resonances, formant tracks gliding between segments), fricatives (band-limited noise) and stop
bursts (short broadband noise). Every utterance draws a speaker (pitch 85–255 Hz, vocal-tract
length scaling the formants ±15 %, speaking rate), then utterance jitter (pitch, speed, level,
onset inside the clip) and background noise at −5–15 dB SNR. Two keywords ("seven", "nine")
share phones with others in another order, so time order matters, not only the phone mix.

The features follow the LMUFormer Speech Commands pipeline (the official ``src/dataloader.py``
calls Kaldi's ``fbank``): 25 ms Hann ("hanning") frames every 10 ms, DC removed, 0.97
pre-emphasis, power spectrum, HTK-mel triangular filters from 20 Hz to Nyquist, natural log;
then the official normalisation ``(fbank − mean) / (2·std)`` with fixed dataset statistics.
Scaled down for CPU: 8 kHz audio, 64 frames (0.655 s) of 32 mel bins by default where the
official model reads 128 frames of 128 bins at 16 kHz. Train and test splits come from
different seeds, hence disjoint speakers. Everything is a pure function of the seed (NumPy).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "KEYWORDS",
    "keyword_signals",
    "keywords",
    "log_mel_fbank",
    "mel_filterbank",
]

# Phones: (kind, formants Hz or noise (centre, bandwidth) Hz, base duration s, level).
_PHONES = {
    "i": ("v", (270, 2290, 3010), 0.11, 1.0),
    "e": ("v", (530, 1840, 2480), 0.11, 1.0),
    "a": ("v", (730, 1090, 2440), 0.12, 1.0),
    "o": ("v", (570, 840, 2410), 0.12, 1.0),
    "u": ("v", (300, 870, 2240), 0.11, 1.0),
    "r": ("v", (490, 1350, 1690), 0.08, 0.8),
    "n": ("v", (250, 1700, 2600), 0.07, 0.35),
    "s": ("f", (3300, 700), 0.09, 0.5),
    "f": ("f", (2000, 2500), 0.08, 0.25),
    "v": ("f", (1500, 2000), 0.05, 0.2),
    "t": ("b", (2800, 2500), 0.03, 0.7),
    "k": ("b", (1800, 1000), 0.03, 0.7),
}
# The ten keywords as phone sequences (rough spoken digits: "zero" .. "nine").
KEYWORDS = (
    ("zero", "sio"),
    ("one", "uan"),
    ("two", "tu"),
    ("three", "fri"),
    ("four", "for"),
    ("five", "faiv"),
    ("six", "siks"),
    ("seven", "sevn"),
    ("eight", "eit"),
    ("nine", "nain"),
)

# log-mel statistics of the default features (300 utterances, seed 0, rounded), used as the
# official code uses its dataset_mean / dataset_std
_FEATURE_MEAN = -2.1
_FEATURE_STD = 2.8


def _band_noise(rng: np.random.Generator, n: int, centre: float, width: float, sr: int):
    """Unit-RMS white noise of ``n`` samples shaped by a Gaussian band (centre, width) in Hz."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec *= np.exp(-0.5 * ((f - centre) / (0.5 * width)) ** 2)
    out = np.fft.irfft(spec, n)
    return out / max(np.sqrt(np.mean(out**2)), 1e-12)


def _ramp(n: int, r: int) -> np.ndarray:
    """Raised-cosine on/off envelope of ``n`` samples with ``r``-sample ramps."""
    env = np.ones(n)
    r = min(r, n // 2)
    if r > 0:
        w = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        env[:r], env[n - r :] = w, w[::-1]
    return env


def _utterance(
    rng: np.random.Generator, phones: str, speaker: tuple[float, float, float], length: int, sr: int
) -> np.ndarray:
    """One keyword inside ``length`` samples of silence, unit RMS over the keyword's span."""
    f0_base, vtl, rate = speaker
    f0 = f0_base * rng.uniform(0.92, 1.08)
    speed = rate * rng.uniform(0.9, 1.1)
    durs = np.array([_PHONES[p][2] for p in phones]) / speed
    durs *= rng.uniform(0.85, 1.15, len(durs))
    n_seg = np.maximum((durs * sr).astype(int), 8)
    total = int(n_seg.sum())
    if total > length:  # squeeze into the clip
        n_seg = np.maximum((n_seg * length / total).astype(int), 8)
        total = int(n_seg.sum())
    start0 = int(rng.integers(0, max(length - total, 0) + 1))
    bounds = start0 + np.concatenate([[0], np.cumsum(n_seg)])
    t = np.arange(length)
    # voiced part: formant knots at 25 % and 75 % of every voiced segment, linear glides between
    knots_t, knots_f, voiced_amp = [], [], np.zeros(length)
    for k, p in enumerate(phones):
        kind, spec, _, level = _PHONES[p]
        a, b = bounds[k], bounds[k + 1]
        if kind == "v":
            knots_t += [a + 0.25 * (b - a), a + 0.75 * (b - a)]
            knots_f += [spec, spec]
            voiced_amp[a:b] = np.maximum(voiced_amp[a:b], level * _ramp(b - a, int(0.015 * sr)))
    out = np.zeros(length)
    if knots_t:
        kt = np.asarray(knots_t)
        kf = np.asarray(knots_f, dtype=np.float64) * vtl
        formants = np.stack([np.interp(t, kt, kf[:, j]) for j in range(3)])  # [3, L]
        # slow pitch contour: declination plus a small wobble
        tt = t / sr
        contour = 1.0 - rng.uniform(0.0, 0.15) * (t - start0) / max(total, 1)
        contour += 0.03 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * tt + rng.uniform(0, 6.3))
        f0_t = f0 * contour
        phase = 2 * np.pi * np.cumsum(f0_t) / sr
        n_h = int(0.47 * sr / (f0 * 0.85))
        # harmonic amplitudes on a 5 ms control grid, linearly upsampled
        step = max(sr // 200, 1)
        tc = np.arange(0, length + step, step)
        fc = np.stack([np.interp(tc, t, formants[j]) for j in range(3)])  # [3, Lc]
        f0c = np.interp(tc, t, f0_t)
        h = np.arange(1, n_h + 1)[:, None]  # [H, 1]
        fh = h * f0c[None]  # [H, Lc]
        bw = np.array([90.0, 110.0, 160.0])[:, None, None]
        gain = np.array([1.0, 0.6, 0.35])[:, None, None]
        env = (gain * np.exp(-0.5 * ((fh[None] - fc[:, None]) / bw) ** 2)).sum(0) + 0.02
        env *= fh < 0.47 * sr  # no aliasing
        phases = rng.uniform(0, 2 * np.pi, (n_h, 1))
        # only where voicing is on, in float32 (the [H, L] products dominate the cost)
        on = np.flatnonzero(voiced_amp)
        i0, i1 = on[0] // step, on[-1] // step + 1  # control intervals holding voicing
        env = env.astype(np.float32)
        w = (np.arange(step) / step).astype(np.float32)
        lo = env[:, i0:i1, None]
        amp = (lo + (env[:, i0 + 1 : i1 + 1, None] - lo) * w).reshape(n_h, -1)  # [H, ≥ b − a]
        a, b = i0 * step, min(i1 * step, length)
        arg = (h * phase[None, a:b] + phases) % (2 * np.pi)
        out = np.zeros(length)
        out[a:b] = (amp[:, : b - a] * np.sin(arg.astype(np.float32))).sum(0) * voiced_amp[a:b]
    for k, p in enumerate(phones):  # fricatives and bursts
        kind, spec, _, level = _PHONES[p]
        if kind == "v":
            continue
        centre, width = spec
        a, b = bounds[k], bounds[k + 1]
        noise = _band_noise(rng, b - a, centre * vtl, width, sr)
        r = int(0.01 * sr) if kind == "f" else max((b - a) // 4, 1)
        out[a:b] += 3.0 * level * noise * _ramp(b - a, r)
    speech = out[bounds[0] : bounds[-1]]
    return out / max(np.sqrt(np.mean(speech**2)), 1e-9)


def keyword_signals(
    num: int,
    length: int,
    *,
    seed: int = 0,
    sample_rate: int = 8000,
    num_speakers: int = 32,
    snr_db: tuple[float, float] = (-5.0, 15.0),
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` utterances: waveforms ``[num, length]`` (float32) and labels ``[num]`` (int32).

    Labels are balanced (``num`` rounded over the ten classes, then shuffled). Each utterance
    draws one of ``num_speakers`` speakers of this seed (different seeds: different speakers),
    a level in [−10, 0] dB and background noise (white plus low-passed) at ``snr_db``.
    """
    if num < 1 or length < 64 or num_speakers < 1:
        raise ValueError(f"keyword_signals: num and num_speakers must be >= 1 and length >= 64 "
                         f"samples, got {num}, {num_speakers}, {length}")  # fmt: skip
    rng = np.random.default_rng(seed)
    f0 = rng.uniform(85.0, 255.0, num_speakers)
    # higher voices have shorter vocal tracts (higher formants), with spread
    vtl = np.clip(0.95 + 0.15 * (f0 - 85.0) / 170.0 + rng.normal(0, 0.04, num_speakers), 0.85, 1.15)
    rate = rng.uniform(0.85, 1.2, num_speakers)
    labels = rng.permutation(np.arange(num) % len(KEYWORDS)).astype(np.int32)
    who = rng.integers(0, num_speakers, num)
    x = np.zeros((num, length), np.float32)
    for n in range(num):
        s = who[n]
        sig = _utterance(rng, KEYWORDS[labels[n]][1], (f0[s], vtl[s], rate[s]), length, sample_rate)
        sig *= 10 ** (rng.uniform(-10.0, 0.0) / 20)
        white = rng.standard_normal(length)
        low = np.cumsum(rng.standard_normal(length))
        low -= np.convolve(low, np.ones(64) / 64, mode="same")
        bg = white / white.std() + rng.uniform(0, 1) * low / max(low.std(), 1e-9)
        speech_rms = np.sqrt(np.mean(sig[np.abs(sig) > 0] ** 2)) if np.any(sig) else 1.0
        bg *= speech_rms / np.sqrt(np.mean(bg**2)) * 10 ** (-rng.uniform(*snr_db) / 20)
        x[n] = 0.1 * (sig + bg)
    return x, labels


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    num_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0, high_freq: float = 0.0
) -> np.ndarray:
    """Kaldi-style triangular mel filters ``[n_fft // 2 + 1, num_bins]`` (HTK mel scale,
    ``1127 ln(1 + f / 700)``, triangles equally spaced in mel; ``high_freq <= 0`` is relative to
    Nyquist as in Kaldi)."""
    nyq = 0.5 * sample_rate
    hi = high_freq if high_freq > 0 else nyq + high_freq
    if not 0 <= low_freq < hi <= nyq:
        raise ValueError(f"mel_filterbank: need 0 <= low_freq < high_freq <= {nyq}, got "
                         f"{low_freq}, {hi}")  # fmt: skip

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f) / 700.0)

    edges = np.linspace(mel(low_freq), mel(hi), num_bins + 2)
    fm = mel(np.arange(n_fft // 2 + 1) * sample_rate / n_fft)[:, None]  # [F, 1]
    left, centre, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    up = (fm - left) / (centre - left)
    down = (right - fm) / (right - centre)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel_fbank(
    wave: np.ndarray,
    sample_rate: int,
    num_mel_bins: int,
    *,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
) -> np.ndarray:
    """Log-mel filterbank features ``[..., T, num_mel_bins]`` of waveforms ``[..., L]``, Kaldi
    ``fbank`` defaults as the official LMUFormer loader uses them (``htk_compat``, no energy,
    ``window_type='hanning'``, ``dither=0``, ``snip_edges``: ``T = 1 + (L − win) // shift``);
    the FFT is zero-padded to the next power of two and ``log`` floors at float32 epsilon."""
    wave = np.asarray(wave)
    if wave.ndim < 1 or not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"log_mel_fbank: wave must be float [..., L], got shape {wave.shape} "
                         f"and dtype {wave.dtype}")  # fmt: skip
    wave = wave.astype(np.float64)
    win = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if wave.shape[-1] < win:
        raise ValueError(f"log_mel_fbank: wave has {wave.shape[-1]} samples, fewer than one "
                         f"{win}-sample frame")  # fmt: skip
    n_frames = 1 + (wave.shape[-1] - win) // shift
    idx = np.arange(n_frames)[:, None] * shift + np.arange(win)[None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    n_fft = 1 << (win - 1).bit_length()
    fbank = mel_filterbank(num_mel_bins, n_fft, sample_rate).astype(np.float64)

    def features(w):  # [M, L] -> [M, T, num_mel_bins]
        frames = w[..., idx]  # [M, T, win]
        frames = frames - frames.mean(-1, keepdims=True)  # remove_dc_offset
        prev = np.concatenate([frames[..., :1], frames[..., :-1]], -1)
        frames = (frames - preemphasis * prev) * window
        power = np.abs(np.fft.rfft(frames, n_fft)) ** 2
        return np.log(np.maximum(power @ fbank, np.finfo(np.float32).eps)).astype(np.float32)

    # A few MB of float64 frames at a time: the same numbers (row by row), and for 2,560 clips
    # of 64 frames 0.86 s instead of 4.2 s with every frame in memory at once (one run, both).
    rows = wave.reshape(-1, wave.shape[-1])
    chunk = max(1, (8 << 20) // (8 * n_frames * n_fft))
    out = [features(rows[i : i + chunk]) for i in range(0, max(len(rows), 1), chunk)]
    return np.concatenate(out).reshape(*wave.shape[:-1], n_frames, num_mel_bins)


@functools.lru_cache(maxsize=4)
def keywords(
    num: int,
    *,
    seed: int = 0,
    num_frames: int = 64,
    num_mel_bins: int = 32,
    sample_rate: int = 8000,
    num_speakers: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` keyword utterances as normalised log-mel frames ``x [num, num_frames,
    num_mel_bins]`` (float32) and labels ``y [num]`` (int32, 10 balanced classes).

    The clip is exactly long enough for ``num_frames`` frames (official: pad/cut to 128), and
    the features are normalised as the official loader does, ``(fbank − mean) / (2·std)``. The
    result is cached (treat it as read-only).
    """
    if num_frames < 1 or num_mel_bins < 1:
        raise ValueError(f"keywords: num_frames and num_mel_bins must be >= 1, got "
                         f"{num_frames}, {num_mel_bins}")  # fmt: skip
    win, shift = sample_rate * 25 // 1000, sample_rate * 10 // 1000
    length = (num_frames - 1) * shift + win
    wave, y = keyword_signals(
        num, length, seed=seed, sample_rate=sample_rate, num_speakers=num_speakers
    )
    x = log_mel_fbank(wave, sample_rate, num_mel_bins)
    x = (x - _FEATURE_MEAN) / (2 * _FEATURE_STD)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y
