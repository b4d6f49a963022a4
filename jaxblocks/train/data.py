"""In-memory datasets with a *stateless* position: the batch of step ``s`` is a pure function of
``(seed, s)``.

That makes resumption exact for free (the checkpointed position is just the step; Levanter
#309/#311 name data-loader replay as the biggest restart cost) and lets every host compute its own
slice of a global batch without coordination. Epoch ``e`` is a permutation drawn from
``default_rng((seed, e))``; the last partial batch of an epoch is dropped.

Sources (all local, nothing is downloaded; `DATASETS` by ``config.data.name``, extended with
`register_dataset`): ``synthetic`` (Gaussian images labelled by a fixed random linear teacher),
``digits`` (scikit-learn's digits via `jaxblocks.data.digits`), ``moving_digits`` (token
videos of a moving digit, `jaxblocks.data.moving_digits`), ``order_flow`` (order-flow images
of a simulated market, `jaxblocks.data.order_flow`), ``ellipsoids3d`` (labelled ellipsoids
in noisy volumes, `jaxblocks.data.ellipsoids`), ``action_clips`` (moving, growing and
shrinking blobs, `jaxblocks.data.action_clips`), ``speech_mix`` (two synthetic speakers and
their mixture, `jaxblocks.data.speech_mix`), ``diffusion_digits`` / ``diffusion_digits_bw``
(digits in [-1, 1] with the label packed as a channel, the latter with inverted copies),
``masked_digits`` (digits with fixed observed-pixel masks), ``keywords`` (synthetic spoken
keywords as log-mel frames, `jaxblocks.data.keywords`), ``speech_noise`` (speech-like signals in
noise, `jaxblocks.data.speech_noise`), ``moving_shapes_video`` (one generated video's frames,
`jaxblocks.data.moving_shapes`), ``temporal_graph`` (windows of a drifting interaction stream,
`jaxblocks.data.temporal_graph`), ``reber`` (generated embedded-Reber strings,
`jaxblocks.data.reber`), ``stdlib_text`` (bytes of the Python standard library's own ``.py``
files, for character LMs) and ``sr_sample_images`` (super-resolution crops of scikit-learn's
sample photographs, `jaxblocks.data.sr_images`).
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass

import jax
import ml_collections
import numpy as np


@dataclass
class ArrayDataset:
    """Examples ``x[i], y[i]`` served as deterministic shuffled global batches.

    Attributes:
      x, y: arrays with equal leading size N.
      batch_size: global batch size.
      seed: shuffle seed.
    """

    x: np.ndarray
    y: np.ndarray
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset: x has {len(self.x)} rows but y has {len(self.y)}")
        if len(self.x) < self.batch_size:
            raise ValueError(
                f"ArrayDataset: {len(self.x)} examples are fewer than one batch of "
                f"{self.batch_size}"
            )

    @property
    def num_examples(self) -> int:
        return len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            if len(cache) > 4:
                cache.clear()
            cache[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.x))
        return cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's slice of the global batch of ``step`` (numpy)."""
        idx = self.indices(step)
        per = self.batch_size // process_count
        idx = idx[process_index * per : (process_index + 1) * per]
        return {"x": self.x[idx], "y": self.y[idx]}

    def position(self, step: int) -> dict:
        """The data position to checkpoint (enough to rebuild the iterator at ``step``)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return {
            "step": int(step),
            "epoch": int(epoch),
            "index_in_epoch": int(i),
            "seed": int(self.seed),
            "num_examples": int(len(self.x)),
        }


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Ordered batches covering every example once; the last is padded and masked by ``w``."""
    n = len(x)
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        w = np.ones(len(xb), np.float32)
        pad = batch_size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
            w = np.concatenate([w, np.zeros(pad, np.float32)])
        yield {"x": xb, "y": yb, "w": w}


def synthetic(num: int, shape: tuple[int, ...], num_classes: int, seed: int):
    """Gaussian inputs labelled by ``argmax(x·W)`` of a fixed random teacher ``W``."""
    teacher = np.random.default_rng(1234).standard_normal((int(np.prod(shape)), num_classes))
    x = np.random.default_rng(seed).standard_normal((num, *shape)).astype(np.float32)
    y = np.argmax(x.reshape(num, -1) @ teacher, -1).astype(np.int32)
    return x, y


@functools.lru_cache(maxsize=2)
def stdlib_bytes(max_bytes: int) -> np.ndarray:
    """The first ``max_bytes`` bytes of the stdlib's ``.py`` files in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests"))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                b = fh.read()
            chunks.append(b)
            total += len(b)
            if total >= max_bytes:
                return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8).copy()
    return np.frombuffer(b"".join(chunks), np.uint8).copy()


Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
# config.data.name -> builder(cfg) -> (x_train, y_train, x_test, y_test, num_classes); the
# number of classes is 0 for tasks without classes (e.g. super-resolution).
DATASETS: dict[str, Callable[[ml_collections.ConfigDict], Splits]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator adding a data set builder ``fn(cfg) -> (x, y, x_test, y_test, num_classes)``
    under ``config.data.name == name`` (a task plug-in's data; nothing may be downloaded)."""

    def deco(fn: Callable[[ml_collections.ConfigDict], Splits]):
        if name in DATASETS and DATASETS[name] is not fn:
            raise ValueError(f"register_dataset: {name!r} is already registered")
        DATASETS[name] = fn
        return fn

    return deco


@register_dataset("synthetic")
def _synthetic(cfg: ml_collections.ConfigDict) -> Splits:
    d = cfg.data
    shape = (d.image_size, d.image_size, d.channels)
    nc = len(d.classes)
    x, y = synthetic(d.num_examples, shape, nc, seed=cfg.seed)
    xt, yt = synthetic(max(d.num_examples // 4, 1), shape, nc, seed=cfg.seed + 1)
    return x, y, xt, yt, nc


@register_dataset("digits")
def _digits(cfg: ml_collections.ConfigDict) -> Splits:
    from jaxblocks.data.digits import load_digits

    d = cfg.data
    kw = dict(classes=tuple(d.classes), size=d.image_size, channels=d.channels)
    x, y = load_digits("train", **kw)
    xt, yt = load_digits("test", **kw)
    return x, y, xt, yt, len(d.classes)


@register_dataset("stdlib_text")
def _stdlib_text(cfg: ml_collections.ConfigDict) -> Splits:
    d = cfg.data
    data = stdlib_bytes(d.max_bytes).astype(np.int32)
    t = d.seq_len
    n = (len(data) - 1) // t
    x = data[: n * t].reshape(n, t)
    y = data[1 : n * t + 1].reshape(n, t)
    cut = max(n - max(n // 10, 1), 1)
    return x[:cut], y[:cut], x[cut:], y[cut:], 256


@register_dataset("sr_sample_images")
def _sr_sample_images(cfg: ml_collections.ConfigDict) -> Splits:
    """Super-resolution pairs (`jaxblocks.data.sr_images`): ``data.num_examples`` training crops
    of scikit-learn's sample photographs and a quarter as many held-out test crops (other
    columns), high-res crops of ``data.image_size`` pixels downscaled ``data.scale`` times
    (x: low-res, y: high-res)."""
    from jaxblocks.data.sr_images import sr_pairs

    d = cfg.data
    x, y = sr_pairs("train", d.num_examples, d.image_size, d.scale, seed=cfg.seed)
    xt, yt = sr_pairs("test", max(d.num_examples // 4, 1), d.image_size, d.scale, seed=1)
    return x, y, xt, yt, 0


@register_dataset("moving_digits")
def _moving_digits(cfg: ml_collections.ConfigDict) -> Splits:
    """Moving-digit token videos (`jaxblocks.data.moving_digits`) for Next Block Prediction:
    inputs are every frame but the last, targets every frame but the first (each token predicts
    the token at its place in the next frame); ``data.image_size`` is the frame size,
    ``data.seq_len`` the number of frames."""
    from jaxblocks.data.moving_digits import moving_digit_videos

    d = cfg.data
    block = d.image_size * d.image_size
    kw = dict(frames=d.seq_len, size=d.image_size, levels=4)
    v = moving_digit_videos(d.num_examples, seed=cfg.seed, **kw)
    vt = moving_digit_videos(max(d.num_examples // 4, 1), seed=cfg.seed + 10_000, **kw)
    return v[:, :-block], v[:, block:], vt[:, :-block], vt[:, block:], 4


@register_dataset("order_flow")
def _order_flow(cfg: ml_collections.ConfigDict) -> Splits:
    """Order-flow images of a simulated market (`jaxblocks.data.order_flow`) with the interval's
    aggregated features packed in a fifth channel; target: the next interval's realized
    volatility. ``data.num_examples`` training intervals, a quarter as many test intervals from
    another simulated period (another seed); ``data.image_size`` time and price bins."""
    from jaxblocks.data.order_flow import order_flow_dataset, pack_features

    d = cfg.data
    kw = dict(time_bins=d.image_size, price_bins=d.image_size, interval=4 * d.image_size)
    tr = order_flow_dataset(d.num_examples, seed=cfg.seed, **kw)
    te = order_flow_dataset(max(d.num_examples // 4, 1), seed=cfg.seed + 10_000, **kw)
    x = pack_features(tr["images"], tr["features"])
    xt = pack_features(te["images"], te["features"])
    return x, tr["target"], xt, te["target"], 0


@register_dataset("ellipsoids3d")
def _ellipsoids3d(cfg: ml_collections.ConfigDict) -> Splits:
    """Labelled ellipsoids in noisy ``data.image_size``³ volumes (`jaxblocks.data.ellipsoids`),
    ``len(data.classes)`` classes counting the background; test volumes from another seed."""
    from jaxblocks.data.ellipsoids import ellipsoid_volumes

    d = cfg.data
    k = len(d.classes)
    x, y = ellipsoid_volumes(d.num_examples, d.image_size, k, seed=cfg.seed)
    xt, yt = ellipsoid_volumes(max(d.num_examples // 4, 1), d.image_size, k, seed=cfg.seed + 1)
    return x, y, xt, yt, k


@register_dataset("action_clips")
def _action_clips(cfg: ml_collections.ConfigDict) -> Splits:
    """Synthetic action clips (`jaxblocks.data.action_clips`): ``data.seq_len`` frames of
    ``data.image_size``² pixels, six motion classes in time-reversed pairs; test clips from
    another seed."""
    from jaxblocks.data.action_clips import ACTIONS, action_clips

    d = cfg.data
    kw = dict(frames=d.seq_len, size=d.image_size)
    x, y = action_clips(d.num_examples, seed=cfg.seed, **kw)
    xt, yt = action_clips(max(d.num_examples // 4, 1), seed=cfg.seed + 10_000, **kw)
    return x, y, xt, yt, len(ACTIONS)


def _diffusion_digits_splits(cfg, inverted: bool):
    from jaxblocks.data.digits import load_digits
    from jaxblocks.models.diffusion_unet import pack_labels

    d = cfg.data
    kw = dict(classes=tuple(d.classes), size=d.image_size, channels=d.channels)
    out = []
    for split in ("train", "test"):
        x, y = load_digits(split, **kw)
        if inverted:  # the negatives as classes k .. 2k-1: bright images with dark strokes
            x, y = np.concatenate([x, 1.0 - x]), np.concatenate([y, y + len(d.classes)])
        out += [pack_labels(2.0 * x - 1.0, y), y]
    k = len(d.classes) * (2 if inverted else 1)
    return (*out, k)


@register_dataset("diffusion_digits")
def _diffusion_digits(cfg):
    """scikit-learn digits for the ``diffusion`` task: x = images in [-1, 1] with the label as a
    last channel (`pack_labels`), y = the labels."""
    return _diffusion_digits_splits(cfg, inverted=False)


@register_dataset("diffusion_digits_bw")
def _diffusion_digits_bw(cfg):
    """``diffusion_digits`` plus every image's negative (label + number of classes): dark and
    bright classes, for the mean-brightness bias of non-zero terminal SNR (One More Step)."""
    return _diffusion_digits_splits(cfg, inverted=True)


MASKED_DIGITS_OBSERVED = 0.4
MASKED_DIGITS_COPIES = 2


@register_dataset("masked_digits")
def _masked_digits(cfg):
    """scikit-learn digits with fixed random observed-pixel masks (Bernoulli
    ``MASKED_DIGITS_OBSERVED``, the official 0.4; ``MASKED_DIGITS_COPIES`` differently masked
    copies of each training image): x = (masked image, mask) [N, H, W, 2], y = (image, mask,
    label) [N, H, W, 3]."""
    from jaxblocks.data.digits import load_digits

    d = cfg.data
    frac = MASKED_DIGITS_OBSERVED
    copies = {"train": 1 if cfg.smoke else MASKED_DIGITS_COPIES, "test": 1}
    out = []
    for i, split in enumerate(("train", "test")):
        x, y = load_digits(split, classes=tuple(d.classes), size=d.image_size, channels=1)
        x, y = np.repeat(x, copies[split], axis=0), np.repeat(y, copies[split], axis=0)
        mask = (np.random.default_rng((cfg.seed, i)).random(x.shape) < frac).astype(np.float32)
        label = np.broadcast_to(y[:, None, None, None].astype(np.float32), x.shape)
        out += [np.concatenate([x * mask, mask], -1), np.concatenate([x, mask, label], -1)]
    return (*out, len(d.classes))


@register_dataset("reber")
def _reber(cfg: ml_collections.ConfigDict) -> Splits:
    """Embedded Reber-grammar strings (`jaxblocks.data.reber`) for next-symbol prediction:
    ``data.num_examples`` training strings, a quarter as many test strings (another seed),
    padded to ``data.seq_len``."""
    from jaxblocks.data.reber import VOCAB_SIZE, reber_lm_data

    d = cfg.data
    x, y = reber_lm_data(d.num_examples, d.seq_len, seed=cfg.seed)
    xt, yt = reber_lm_data(max(d.num_examples // 4, 1), d.seq_len, seed=cfg.seed + 10_000)
    return x, y, xt, yt, VOCAB_SIZE


@register_dataset("wave2d")
def _wave2d(cfg: ml_collections.ConfigDict) -> Splits:
    """2-D wave-equation surrogate pairs (`jaxblocks.data.wave`): (u(t−1), u(t)) → u(t+4) on a
    ``data.image_size`` grid; test pairs from other random initial fields (another seed)."""
    from jaxblocks.data.wave import wave_pairs

    d = cfg.data
    x, y = wave_pairs(d.num_examples, d.image_size, seed=cfg.seed)
    xt, yt = wave_pairs(max(d.num_examples // 4, 1), d.image_size, seed=cfg.seed + 10_000)
    return x, y, xt, yt, 0


@register_dataset("speech_mix")
def _speech_mix(cfg: ml_collections.ConfigDict) -> Splits:
    """Synthetic two-speaker mixtures (`jaxblocks.data.speech_mix`) of ``data.seq_len`` samples:
    x = mixture [N, T], y = sources then the mixture [N, T, 3]; test mixtures from another
    seed."""
    from jaxblocks.data.speech_mix import speech_mix

    d = cfg.data
    x, y = speech_mix(d.num_examples, d.seq_len, seed=cfg.seed)
    xt, yt = speech_mix(max(d.num_examples // 4, 1), d.seq_len, seed=cfg.seed + 10_000)
    return x, y, xt, yt, 0


@register_dataset("speech_noise")
def _speech_noise(cfg: ml_collections.ConfigDict) -> Splits:
    """Synthetic speech in white/pink/babble noise at −5..10 dB SNR
    (`jaxblocks.data.speech_noise`) of ``data.seq_len`` samples: x = noisy [N, T], y = clean
    then noisy [N, T, 2]; test pairs from another seed."""
    from jaxblocks.data.speech_noise import speech_noise

    d = cfg.data
    x, y = speech_noise(d.num_examples, d.seq_len, seed=cfg.seed)
    xt, yt = speech_noise(max(d.num_examples // 4, 1), d.seq_len, seed=cfg.seed + 10_000)
    return x, y, xt, yt, 0


@register_dataset("moving_shapes_video")
def _moving_shapes_video(cfg: ml_collections.ConfigDict) -> Splits:
    """One synthetic RGB video (`jaxblocks.data.moving_shapes`) of ``data.seq_len`` frames of
    ``data.image_size``² pixels for HNeRV-style video fitting: each example is (frame, frame)
    and the test set is the same frames (a representation is fitted to the video it stores)."""
    from jaxblocks.data.moving_shapes import moving_shapes_video

    d = cfg.data
    v = moving_shapes_video(d.seq_len, d.image_size, seed=cfg.seed)
    return v, v, v, v, 0


@register_dataset("temporal_graph")
def _temporal_graph(cfg: ml_collections.ConfigDict) -> Splits:
    """Windows of ``data.seq_len`` consecutive events of a synthetic temporal interaction graph
    (`jaxblocks.data.temporal_graph`; ``model.kwargs.num_nodes`` / ``edge_dim``, default 64 / 4):
    one window is one example, so i.i.d. sampling keeps time order inside each; the first
    ``data.num_examples`` windows train, the next quarter as many test (later in time)."""
    from jaxblocks.data.temporal_graph import temporal_windows

    d, kw = cfg.data, cfg.model.kwargs
    n_test = max(d.num_examples // 4, 1)
    x, y = temporal_windows(d.num_examples + n_test, d.seq_len, kw.get("num_nodes", 64),
                            kw.get("edge_dim", 4), seed=cfg.seed)  # fmt: skip
    n = d.num_examples
    return x[:n], y[:n], x[n:], y[n:], 0


@register_dataset("keywords")
def _keywords(cfg: ml_collections.ConfigDict) -> Splits:
    """Synthetic spoken keywords (`jaxblocks.data.keywords`, 10 classes) as normalised log-mel
    frames ``[N, data.seq_len, data.channels]``; test utterances from other speakers (another
    seed), a quarter as many."""
    from jaxblocks.data.keywords import KEYWORDS, keywords

    d = cfg.data
    kw = dict(num_frames=d.seq_len, num_mel_bins=d.channels)
    x, y = keywords(d.num_examples, seed=cfg.seed, **kw)
    xt, yt = keywords(max(d.num_examples // 4, 1), seed=cfg.seed + 10_000, **kw)
    return x, y, xt, yt, len(KEYWORDS)


def make_datasets(cfg: ml_collections.ConfigDict):
    """``(train ArrayDataset, (x_test, y_test), num_classes)`` for ``cfg.data``."""
    name = cfg.data.name
    if name not in DATASETS:
        raise ValueError(
            f"config.data.name: unknown dataset {name!r}; choose one of {tuple(DATASETS)}"
        )
    x, y, xt, yt, nc = DATASETS[name](cfg)
    return ArrayDataset(x, y, cfg.batch_size, seed=cfg.seed), (xt, yt), nc


def process_slice() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()
