"""The official Soft-NMS loop in NumPy: the oracle of the tests and the benchmark's baseline.

A line-by-line port of ``cpu_soft_nms`` (bharatsingh430/soft-nms, ``lib/nms/cpu_nms.pyx``),
in float64, keeping its in-place swaps; it additionally tracks each row's original index.
"""

from __future__ import annotations

import numpy as np

__all__ = ["official_soft_nms"]


def official_soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    sigma: float = 0.5,
    nt: float = 0.3,
    threshold: float = 0.001,
    method: int = 2,
    plus1: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``cpu_soft_nms(boxes, sigma, Nt, threshold, method)``: method 0 hard, 1 linear, 2 gaussian.

    Returns the original indices and scores of the kept boxes in selection order. The areas
    use ``+ 1`` when ``plus1`` (the official convention) and continuous ones otherwise.
    """
    b = np.concatenate([boxes, scores[:, None], np.arange(len(scores))[:, None]], 1)
    b = b.astype(np.float64)
    n, one = len(b), 1.0 if plus1 else 0.0
    i = 0
    while i < n:
        maxpos = i + int(np.argmax(b[i:n, 4]))  # first maximum, as the strict '<' scan
        b[[i, maxpos]] = b[[maxpos, i]]
        tx1, ty1, tx2, ty2 = b[i, :4]
        pos = i + 1
        while pos < n:
            x1, y1, x2, y2 = b[pos, :4]
            area = (x2 - x1 + one) * (y2 - y1 + one)
            iw = min(tx2, x2) - max(tx1, x1) + one
            if iw > 0:
                ih = min(ty2, y2) - max(ty1, y1) + one
                if ih > 0:
                    ua = (tx2 - tx1 + one) * (ty2 - ty1 + one) + area - iw * ih
                    ov = iw * ih / ua
                    if method == 1:
                        weight = 1 - ov if ov > nt else 1.0
                    elif method == 2:
                        weight = np.exp(-(ov * ov) / sigma)
                    else:
                        weight = 0.0 if ov > nt else 1.0
                    b[pos, 4] *= weight
            if b[pos, 4] < threshold:
                b[pos] = b[n - 1]
                n -= 1
                pos -= 1
            pos += 1
        i += 1
    return b[:n, 5].astype(int), b[:n, 4]
