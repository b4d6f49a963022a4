"""scikit-learn's handwritten digits (UCI ML digits), upsampled to small NHWC images.

The 1,797 8x8 grey-level images ship inside scikit-learn, so nothing is downloaded. This is the
data of the foundation `make train` job: a ConvBN ResNet pretrained on some digits and
transferred to others (the config `jaxblocks/configs/convbn_digits.py`).

Example:
  >>> from jaxblocks.data.digits import load_digits, iterate_batches
  >>> x, y = load_digits("train", classes=(0, 1, 2, 3, 4), size=16, channels=1)
  >>> x.shape[1:], x.dtype, sorted(set(y.tolist()))
  ((16, 16, 1), dtype('float32'), [0, 1, 2, 3, 4])
  >>> xb, yb = next(iterate_batches(x, y, batch_size=32, seed=0))
  >>> xb.shape
  (32, 16, 16, 1)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 10
# Raw pixel values are integers in [0, 16].
_PIXEL_MAX = 16.0
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    images = (np.asarray(d.images, np.float32) / _PIXEL_MAX).astype(np.float32)  # [N, 8, 8]
    labels = np.asarray(d.target, np.int32)  # [N]
    return images, labels


@functools.lru_cache(maxsize=8)
def _split_indices(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the whole data set: each digit contributes the same test fraction.

    The split is made over all ten digits before any class filtering, so the test images of
    digits 0-4 and of digits 5-9 come from one and the same split.
    """
    _, labels = _raw()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    n = images.shape[0]
    if images.shape[1:] == (size, size):
        return images
    out = jax.image.resize(jnp.asarray(images), (n, size, size), method="bilinear")
    # Bilinear weights are convex, but keep the documented [0, 1] range exact under rounding.
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def load_digits(
    split: str,
    *,
    classes: Sequence[int] | None = None,
    size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.25,
    seed: int = 0,
    relabel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of the digits as NHWC float32 images in [0, 1] and int32 labels.

    Args:
      split: ``"train"`` or ``"test"``.
      classes: digits to keep (e.g. ``(5, 6, 7, 8, 9)``); ``None`` keeps all ten.
      size: output height and width; the 8x8 images are resized bilinearly (``jax.image.resize``).
      channels: 1 (grey) or 3 (the grey image repeated, for RGB models).
      test_fraction: share of every digit's images held out for ``"test"``, in (0, 1).
      seed: seed of the (stratified, deterministic) train/test split.
      relabel: map the kept digits to ``0..len(classes)-1`` in the order given; if False the
        labels stay the digits themselves.

    Returns:
      ``(images, labels)``: ``images`` float32 ``[N, size, size, channels]`` and ``labels`` int32
      ``[N]``, in a fixed order (shuffle with `iterate_batches`).
    """
    if split not in SPLITS:
        raise ValueError(f"load_digits: split must be one of {SPLITS}, got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"load_digits: channels must be 1 or 3, got {channels!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"load_digits: size must be a positive int, got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    if classes is None:
        classes = tuple(range(NUM_CLASSES))
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"load_digits: classes must be non-empty and unique, got {classes!r}")
    if any(not 0 <= c < NUM_CLASSES for c in classes):
        raise ValueError(f"load_digits: classes must be digits in 0..9, got {classes!r}")

    images, labels = _raw()
    train_idx, test_idx = _split_indices(float(test_fraction), int(seed))
    idx = train_idx if split == "train" else test_idx
    idx = idx[np.isin(labels[idx], classes)]
    x = _resize(images[idx], size)[..., None]  # [N, size, size, 1]
    if channels == 3:
        x = np.repeat(x, 3, axis=-1)  # [N, size, size, 3]
    y = labels[idx]
    if relabel:
        lut = np.full(NUM_CLASSES, -1, np.int32)
        lut[list(classes)] = np.arange(len(classes), dtype=np.int32)
        y = lut[y]
    return np.ascontiguousarray(x, np.float32), y.astype(np.int32)


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over ``(images, labels)`` in batches of ``batch_size``.

    Args:
      images, labels: arrays with the same leading size N.
      batch_size: examples per batch (>= 1).
      seed: seed of the shuffle; the same seed gives the same order.
      shuffle: permute the examples first.
      drop_remainder: drop the last partial batch (fixed shapes, so a jitted step compiles once).

    Yields:
      ``(images[b], labels[b])`` numpy batches.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(
            f"iterate_batches: images and labels need the same length, got {n} and {len(labels)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be a positive int, got {batch_size!r}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        b = order[start : start + batch_size]
        yield images[b], labels[b]
