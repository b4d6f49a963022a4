"""scikit-learn digits loader: shapes, range, deterministic split, filtering, batching."""

import numpy as np
import pytest

from jaxblocks.data.digits import iterate_batches, load_digits


def test_shapes_range_and_dtypes():
    x, y = load_digits("train", size=16, channels=3)
    assert x.ndim == 4 and x.shape[1:] == (16, 16, 3)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[0] == y.shape[0]
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    # The three channels are the same grey image.
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    x1, _ = load_digits("train", size=16, channels=1)
    assert x1.shape[-1] == 1
    np.testing.assert_array_equal(x1[..., 0], x[..., 0])


def test_native_size_is_raw_pixels_over_16():
    from sklearn.datasets import load_digits as sk_load

    x, y = load_digits("test", size=8, channels=1, relabel=False)
    raw = sk_load()
    # Every loaded image equals some raw image of the same digit, scaled to [0, 1].
    first = x[0, ..., 0] * 16.0
    matches = np.flatnonzero(np.all(raw.images == first, axis=(1, 2)))
    assert matches.size >= 1 and y[0] in raw.target[matches]


def test_split_is_deterministic_disjoint_and_stratified():
    xa, ya = load_digits("train", size=8, channels=1, relabel=False)
    xb, yb = load_digits("train", size=8, channels=1, relabel=False)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    xt, yt = load_digits("test", size=8, channels=1, relabel=False)
    assert len(xa) + len(xt) == 1797
    # Every image lands in exactly one split, and each digit gives ~25% of its images to test.
    train_counts, test_counts = np.bincount(ya), np.bincount(yt)
    share = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(share - 0.25) < 0.01)
    # Another seed gives another split.
    xs, _ = load_digits("test", size=8, channels=1, seed=1, relabel=False)
    assert xs.shape == xt.shape and not np.array_equal(xs, xt)


def test_class_filter_and_relabel():
    x, y = load_digits("train", classes=(5, 6, 7, 8, 9), size=8, channels=1)
    assert set(np.unique(y).tolist()) == {0, 1, 2, 3, 4}
    _, y_raw = load_digits("train", classes=(5, 6, 7, 8, 9), size=8, channels=1, relabel=False)
    np.testing.assert_array_equal(y_raw, y + 5)
    _, y_rev = load_digits("train", classes=(9, 3), size=8, channels=1)
    _, y_rev_raw = load_digits("train", classes=(9, 3), size=8, channels=1, relabel=False)
    np.testing.assert_array_equal(y_rev, np.where(y_rev_raw == 9, 0, 1))
    # Filtered test sets of two halves partition the full test set.
    n_lo = len(load_digits("test", classes=range(5), size=8)[1])
    n_hi = len(load_digits("test", classes=range(5, 10), size=8)[1])
    assert n_lo + n_hi == len(load_digits("test", size=8)[1])


def test_iterate_batches_covers_once_and_is_seeded():
    x, y = load_digits("test", size=8, channels=1)
    ids = np.arange(len(x))
    batches = list(iterate_batches(ids, y, 32, seed=3))
    assert all(b.shape == (32,) for b, _ in batches)
    seen = np.concatenate([b for b, _ in batches])
    assert len(seen) == len(x) - len(x) % 32 and len(np.unique(seen)) == len(seen)
    for b, lab in batches:
        np.testing.assert_array_equal(lab, y[b])
    again = np.concatenate([b for b, _ in iterate_batches(ids, y, 32, seed=3)])
    np.testing.assert_array_equal(seen, again)
    other = np.concatenate([b for b, _ in iterate_batches(ids, y, 32, seed=4)])
    assert not np.array_equal(seen, other)
    full = list(iterate_batches(ids, y, 32, shuffle=False, drop_remainder=False))
    np.testing.assert_array_equal(np.concatenate([b for b, _ in full]), ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "valid"}, "split"),
        ({"split": "train", "channels": 2}, "channels"),
        ({"split": "train", "size": 0}, "size"),
        ({"split": "train", "classes": (1, 10)}, "classes"),
        ({"split": "train", "classes": ()}, "classes"),
        ({"split": "train", "classes": (1, 1)}, "classes"),
        ({"split": "train", "test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


def test_bad_batch_arguments():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(x, np.zeros(4), 0))
    with pytest.raises(ValueError, match="same length"):
        next(iterate_batches(x, np.zeros(3), 2))
