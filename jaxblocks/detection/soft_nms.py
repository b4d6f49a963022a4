"""Soft-NMS — Bodla, Singh, Chellappa, Davis, "Soft-NMS: Improving Object Detection With One
Line of Code", ICCV 2017, https://arxiv.org/abs/1704.04503 (official code:
bharatsingh430/soft-nms, ``lib/nms/cpu_nms.pyx::cpu_soft_nms``).

Instead of deleting every box that overlaps the selected one by more than a threshold (hard
NMS), Soft-NMS decays their scores by a function of the overlap and keeps selecting from what
remains:

* ``"linear"``:   s_i ← s_i · (1 − IoU(M, b_i))  where IoU > ``iou_threshold``;
* ``"gaussian"``: s_i ← s_i · exp(−IoU(M, b_i)² / σ)  for every remaining box;
* ``"hard"``:     s_i ← 0  where IoU > ``iou_threshold`` (classic NMS).

A box whose score falls below ``score_threshold`` is dropped. The JAX form is a fixed-size
`jax.lax.fori_loop` over the N selections with masks, so it jits and `jax.vmap`s over a batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = ["METHODS", "SoftNMSResult", "soft_nms", "box_iou"]

METHODS = ("gaussian", "linear", "hard")


@dataclasses.dataclass(frozen=True)
class SoftNMSResult:
    """The selections of `soft_nms`, padded to N (a pytree: `jax.vmap` batches each field).

    Attributes:
      indices: ``[N]`` int32 original indices in selection order; -1 past the last selection.
      scores: ``[N]`` the decayed score of each selected box when it was selected; 0 past the
        last selection.
      valid: ``[N]`` True for the selections; they come first (``valid.sum()`` boxes).
    """

    indices: Int[Array, " N"]
    scores: Float[Array, " N"]
    valid: Bool[Array, " N"]

    def __iter__(self):  # `indices, scores, valid = soft_nms(...)`
        return iter((self.indices, self.scores, self.valid))


jax.tree_util.register_dataclass(
    SoftNMSResult, data_fields=["indices", "scores", "valid"], meta_fields=[]
)


def box_iou(
    box: Float[Array, "4"], boxes: Float[Array, "N 4"], *, pixel_convention: bool = False
) -> Float[Array, " N"]:
    """IoU of one (x1, y1, x2, y2) box with each of ``boxes``; 0 where they do not overlap.

    Continuous coordinates: the area of a box is (x2 − x1)(y2 − y1). ``pixel_convention=True``
    counts inclusive pixels as the official code does, (x2 − x1 + 1)(y2 − y1 + 1). The union is
    only formed where the intersection is positive, so zero-area boxes never divide by zero.
    """
    one = 1.0 if pixel_convention else 0.0
    iw = jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]) + one
    ih = jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]) + one
    overlap = (iw > 0) & (ih > 0)
    inter = jnp.where(overlap, iw * ih, 0.0)
    area = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    areas = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    union = jnp.where(overlap, area + areas - inter, 1.0)
    return jnp.where(overlap, inter / union, 0.0)


def _check(boxes, scores, method, sigma, iou_threshold, score_threshold, pixel_convention):
    op = "soft_nms"
    if not hasattr(boxes, "shape") or boxes.ndim != 2 or boxes.shape[-1] != 4:
        shape = getattr(boxes, "shape", type(boxes).__name__)
        raise ValueError(f"{op}: boxes must be [N, 4] (x1, y1, x2, y2), got {shape}")
    if not hasattr(scores, "shape") or scores.shape != boxes.shape[:1]:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"{op}: scores must be [N] with N = {boxes.shape[0]}, got {shape}")
    for name, x in (("boxes", boxes), ("scores", scores)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    for name, v in (("sigma", sigma), ("iou_threshold", iou_threshold),
                    ("score_threshold", score_threshold)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
            raise TypeError(f"{op}: {name} must be a finite Python number, got {v!r}")
    if sigma <= 0:
        raise ValueError(f"{op}: sigma must be > 0, got {sigma}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"{op}: iou_threshold must be in [0, 1], got {iou_threshold}")
    if score_threshold < 0:
        raise ValueError(f"{op}: score_threshold must be >= 0, got {score_threshold}")
    if not isinstance(pixel_convention, bool | np.bool_):
        raise TypeError(
            f"{op}: pixel_convention must be a bool, got {type(pixel_convention).__name__} "
            f"{pixel_convention!r}"
        )


def soft_nms(
    boxes: Float[Array, "N 4"],
    scores: Float[Array, " N"],
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
    pixel_convention: bool = False,
) -> SoftNMSResult:
    """Soft-NMS (https://arxiv.org/abs/1704.04503) of one image's boxes; jittable, vmappable.

    Each step selects the remaining box M with the highest (decayed) score, then decays the
    scores of all remaining boxes by their IoU with M (``method``, see the module docstring;
    linear and hard decay apply only where IoU > ``iou_threshold``, strictly, as the official
    code) and drops those whose score is now below ``score_threshold``.

    Differences from the official ``cpu_soft_nms``, on purpose:

    * Ties: among exactly equal scores the lowest original index is selected first; the
      official code's order depends on the positions its in-place swaps leave boxes in.
    * A box whose *initial* score is below ``score_threshold`` is never selected; the official
      loop checks the threshold only after a decay, so it always keeps its first box.
    * Areas are continuous, (x2 − x1)(y2 − y1); ``pixel_convention=True`` restores the
      official ``+ 1``.
    * NaN scores compare false with everything, so a NaN-scored box is dropped; NaN
      coordinates give an IoU of 0 (no decay).

    Args:
      boxes: ``[N, 4]`` as (x1, y1, x2, y2) with x2 ≥ x1 and y2 ≥ y1.
      scores: ``[N]`` scores.
      method: ``"gaussian"`` (default, the paper's), ``"linear"`` or ``"hard"``.
      sigma: Gaussian width σ (the official default 0.5).
      iou_threshold: N_t for linear and hard decay (0.3).
      score_threshold: boxes below it are dropped (0.001).
      pixel_convention: count inclusive pixels in areas (the official code's ``+ 1``).

    Returns:
      `SoftNMSResult` ``(indices, scores, valid)`` of size N in selection order.

    Example:
      >>> boxes = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]])
      >>> idx, sc, valid = soft_nms(boxes, jnp.array([0.9, 0.8, 0.7]), method="linear")
      >>> idx.tolist(), valid.tolist()
      ([0, 2, 1], [True, True, True])
    """
    _check(boxes, scores, method, sigma, iou_threshold, score_threshold, pixel_convention)
    n = boxes.shape[0]
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    boxes = boxes.astype(dtype)
    scores = scores.astype(dtype)

    def decay(iou: Array) -> Array:
        if method == "gaussian":
            return jnp.exp(-(iou * iou) / sigma)
        if method == "linear":
            return jnp.where(iou > iou_threshold, 1.0 - iou, 1.0)
        return jnp.where(iou > iou_threshold, 0.0, 1.0)

    def step(i, carry):
        s, active, out_idx, out_score, out_valid = carry
        # argmax returns the first maximum: the lowest original index among equal scores
        m = jnp.argmax(jnp.where(active, s, -jnp.inf))
        any_left = jnp.any(active)
        out_idx = out_idx.at[i].set(jnp.where(any_left, m, -1).astype(jnp.int32))
        out_score = out_score.at[i].set(jnp.where(any_left, s[m], 0.0))
        out_valid = out_valid.at[i].set(any_left)
        active = active.at[m].set(False)
        iou = box_iou(boxes[m], boxes, pixel_convention=pixel_convention)
        s = jnp.where(active & any_left, s * decay(iou), s)
        active = active & (s >= score_threshold)
        return s, active, out_idx, out_score, out_valid

    if n == 0:  # nothing to select (argmax of an empty array is an error)
        return SoftNMSResult(jnp.zeros((0,), jnp.int32), scores, jnp.zeros((0,), bool))
    init = (
        scores,
        scores >= score_threshold,
        jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), dtype),
        jnp.zeros((n,), bool),
    )
    _, _, indices, out_scores, valid = jax.lax.fori_loop(0, n, step, init)
    return SoftNMSResult(indices, out_scores, valid)
