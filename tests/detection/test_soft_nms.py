"""Soft-NMS against a NumPy port of the official ``cpu_soft_nms`` loop (bharatsingh430/soft-nms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.detection import box_iou, soft_nms
from jaxblocks.detection.reference import official_soft_nms

CODES = {"hard": 0, "linear": 1, "gaussian": 2}


def _random_boxes(seed: int, n: int, *, spread: float = 40.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, spread, (n, 2))
    wh = rng.uniform(2, 20, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0.01, 1.0, n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("pixel_convention", [False, True])
def test_matches_official_loop(method, pixel_convention):
    for seed, n, spread in ((0, 60, 40.0), (1, 33, 10.0), (2, 7, 100.0)):
        boxes, scores = _random_boxes(seed, n, spread=spread)
        want_idx, want_scores = official_soft_nms(
            boxes, scores, method=CODES[method], plus1=pixel_convention, threshold=0.05
        )
        idx, sc, valid = soft_nms(
            jnp.asarray(boxes), jnp.asarray(scores), method=method,
            pixel_convention=pixel_convention, score_threshold=0.05,
        )  # fmt: skip
        k = int(valid.sum())
        assert bool(valid[:k].all()) and not bool(valid[k:].any())
        np.testing.assert_array_equal(np.asarray(idx[:k]), want_idx)
        np.testing.assert_allclose(np.asarray(sc[:k]), want_scores, rtol=2e-5)
        assert np.all(np.asarray(idx[k:]) == -1) and np.all(np.asarray(sc[k:]) == 0)
        assert len(want_idx) < n or method == "gaussian" or spread > 50  # something is dropped


def test_decay_rules_by_hand():
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 9.5], [50, 50, 60, 60.0]])
    scores = jnp.array([0.9, 0.8, 0.7, 0.6])
    # IoU with box 0: 0.5, 0.95, 0
    iou = box_iou(boxes[0], boxes)
    np.testing.assert_allclose(iou, [1.0, 0.5, 0.95, 0.0], rtol=1e-6)
    idx, sc, valid = soft_nms(boxes, scores, method="linear", iou_threshold=0.5)
    # 0.5 is not > 0.5: box 1 keeps 0.8; box 2 decays to 0.7 * 0.05 = 0.035
    assert idx.tolist()[:4] == [0, 1, 3, 2]
    np.testing.assert_allclose(sc, [0.9, 0.8, 0.6, 0.7 * 0.05 * (1 - float(box_iou(
        boxes[1], boxes[2:3])[0]))], rtol=1e-5)  # fmt: skip
    idx, sc, valid = soft_nms(boxes, scores, method="hard", iou_threshold=0.5)
    assert idx.tolist() == [0, 1, 3, -1] and valid.tolist() == [True, True, True, False]
    idx, sc, _ = soft_nms(boxes, scores, method="gaussian", sigma=0.5)
    assert idx.tolist() == [0, 3, 1, 2]  # box 3 (0.6) now outranks box 1 (0.8 e^-0.5 = 0.485)
    np.testing.assert_allclose(sc[2], 0.8 * np.exp(-0.25 / 0.5), rtol=1e-6)


def test_ties_pick_the_lowest_index_and_zero_area_boxes_are_safe():
    boxes = jnp.array([[5, 5, 5, 5], [0, 0, 4, 4], [0, 0, 4, 4], [5, 5, 5, 9.0], [1, 1, 1, 1]])
    scores = jnp.array([0.5, 0.5, 0.5, 0.5, 0.5])
    idx, sc, valid = soft_nms(boxes, scores, method="linear", iou_threshold=0.1)
    assert valid.tolist() == [True, True, True, True, False]
    assert np.all(np.isfinite(np.asarray(sc)))
    # boxes 1 and 2 coincide: 1 is picked first and 2 decays to 0 (1 - IoU) and is dropped
    assert idx.tolist() == [0, 1, 3, 4, -1]
    iou = box_iou(boxes[0], boxes)  # a zero-area box overlaps nothing, itself included
    assert np.all(np.asarray(iou) == 0)


def test_all_overlapping_empty_and_below_threshold():
    boxes = jnp.tile(jnp.array([[0.0, 0.0, 10.0, 10.0]]), (6, 1))
    scores = jnp.linspace(1.0, 0.5, 6)
    idx, sc, valid = soft_nms(boxes, scores, method="gaussian", sigma=0.5)
    # IoU 1: each selection multiplies the rest by e^-2; the 5th (0.6 e^-8) falls below 0.001
    assert idx.tolist() == [0, 1, 2, 3, -1, -1] and int(valid.sum()) == 4
    np.testing.assert_allclose(sc[:4], scores[:4] * np.exp(-2.0 * np.arange(4)), rtol=1e-5)
    idx, _, valid = soft_nms(boxes, scores, method="hard")
    assert idx.tolist() == [0, -1, -1, -1, -1, -1] and int(valid.sum()) == 1
    out = soft_nms(jnp.zeros((0, 4)), jnp.zeros((0,)))
    assert out.indices.shape == (0,) and out.scores.shape == (0,) and out.valid.shape == (0,)
    idx, _, valid = soft_nms(boxes, jnp.full((6,), 1e-4))  # every score below the threshold
    assert not bool(valid.any()) and idx.tolist() == [-1] * 6
    idx, _, valid = soft_nms(boxes[:3], jnp.array([jnp.nan, 0.9, 0.8]), method="hard")
    assert idx.tolist() == [1, -1, -1]


def test_jit_and_vmap_over_a_batch():
    data = [_random_boxes(s, 20) for s in range(3)]
    boxes = jnp.stack([jnp.asarray(b) for b, _ in data])
    scores = jnp.stack([jnp.asarray(s) for _, s in data])
    fn = jax.jit(jax.vmap(lambda b, s: soft_nms(b, s, method="linear")))
    batched = fn(boxes, scores)
    for i in range(3):
        one = soft_nms(boxes[i], scores[i], method="linear")
        np.testing.assert_array_equal(batched.indices[i], one.indices)
        np.testing.assert_allclose(batched.scores[i], one.scores, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"boxes": jnp.zeros((3, 5))}, ValueError, r"boxes must be \[N, 4\].*\(3, 5\)"),
        ({"boxes": jnp.zeros((4,))}, ValueError, r"boxes must be \[N, 4\]"),
        ({"scores": jnp.zeros((2,))}, ValueError, r"scores must be \[N\] with N = 3, got \(2,\)"),
        ({"scores": jnp.zeros((3,), jnp.int32)}, TypeError, "scores must be floating"),
        ({"boxes": jnp.zeros((3, 4), jnp.int32)}, TypeError, "boxes must be floating"),
        ({"method": "soft"}, ValueError, r"method must be one of .*'soft'"),
        ({"sigma": 0.0}, ValueError, "sigma must be > 0"),
        ({"sigma": "0.5"}, TypeError, "sigma must be a finite Python number"),
        ({"iou_threshold": 1.5}, ValueError, r"iou_threshold must be in \[0, 1\]"),
        ({"score_threshold": -1.0}, ValueError, "score_threshold must be >= 0"),
        ({"score_threshold": float("nan")}, TypeError, "score_threshold must be a finite"),
        ({"pixel_convention": "yes"}, TypeError, "pixel_convention must be a bool"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"boxes": jnp.zeros((3, 4)), "scores": jnp.ones((3,))} | kwargs
    boxes, scores = args.pop("boxes"), args.pop("scores")
    with pytest.raises(exc, match=match):
        soft_nms(boxes, scores, **args)
