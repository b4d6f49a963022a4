"""Synthetic spoken keywords: determinism, shapes, balance, finite features, Kaldi-style
filterbank, and classes a trivial classifier can already tell apart."""

from __future__ import annotations

import numpy as np
import pytest

from jaxblocks.data.keywords import (
    KEYWORDS,
    keyword_signals,
    keywords,
    log_mel_fbank,
    mel_filterbank,
)


def test_deterministic_shapes_balanced_and_finite():
    x, y = keywords(40, seed=0, num_frames=24, num_mel_bins=16)
    x2, y2 = keywords.__wrapped__(40, seed=0, num_frames=24, num_mel_bins=16)  # uncached
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (40, 24, 16) and x.dtype == np.float32
    assert y.shape == (40,) and y.dtype == np.int32
    assert np.bincount(y, minlength=10).tolist() == [4] * 10
    assert np.isfinite(x).all()
    # normalised like the official loader: roughly zero mean, std near 1/2
    assert abs(float(x.mean())) < 0.5 and 0.2 < float(x.std()) < 1.0
    x3, _ = keywords(40, seed=1, num_frames=24, num_mel_bins=16)
    assert not np.allclose(x, x3)


def test_signals_are_bounded_and_speech_sits_inside_the_clip():
    w, y = keyword_signals(10, 5200, seed=3, snr_db=(5.0, 25.0))
    assert w.shape == (10, 5200) and np.isfinite(w).all() and 0 < np.abs(w).max() < 1
    assert len(KEYWORDS) == 10
    # the keyword stands out of a background 5 dB or more below it: the loudest 12.5 ms of the clip
    # carries several times the energy of the quietest
    e = (w.reshape(10, 52, 100) ** 2).mean(-1)
    assert np.all(e.max(1) > 4 * e.min(1))
    with pytest.raises(ValueError, match="length >= 64"):
        keyword_signals(4, 32)


def test_log_mel_fbank_frames_and_a_tone_peaks_in_its_mel_bin():
    sr, f = 8000, 1000.0
    wave = np.sin(2 * np.pi * f * np.arange(4000) / sr)
    feats = log_mel_fbank(wave, sr, 24)
    assert feats.shape == (1 + (4000 - 200) // 80, 24)  # Kaldi snip_edges
    fb = mel_filterbank(24, 256, sr)
    assert fb.shape == (129, 24) and fb.min() >= 0 and fb.max() <= 1
    # the filter whose triangle holds 1 kHz is the loudest one
    assert int(np.argmax(feats.mean(0))) == int(np.argmax(fb[32]))  # bin 32 = 1000 Hz
    with pytest.raises(ValueError, match="fewer than one"):
        log_mel_fbank(np.ones(50), sr, 8)
    with pytest.raises(ValueError, match="wave must be float"):
        log_mel_fbank(np.ones(500, np.int32), sr, 8)


def test_classes_are_distinguishable_across_speakers():
    # nearest class centroid of the time-averaged spectrum, fitted on one seed's speakers and
    # scored on another's: far above chance (0.1), far below perfect (order matters too)
    x, y = keywords(100, seed=0, num_frames=32, num_mel_bins=16)
    xt, yt = keywords(50, seed=10_000, num_frames=32, num_mel_bins=16)
    c = np.stack([x[y == k].mean((0, 1)) for k in range(10)])
    pred = np.argmin(((xt.mean(1)[:, None] - c[None]) ** 2).sum(-1), 1)
    assert (pred == yt).mean() > 0.2
