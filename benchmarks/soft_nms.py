"""Soft-NMS: the jitted JAX loop vs the official algorithm's NumPy loop, side by side on CPU.

Random boxes (uniform centres, sides 2–20 in a 200² image), Gaussian decay; both run the same
selections (asserted). The JAX version is one `lax.fori_loop` of N vectorised steps, so its cost
is O(N²) regardless of how many boxes survive; the official loop only visits the survivors.
Median of interleaved runs; ``vmap`` over a batch of 8 images is timed per image.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.detection import soft_nms
from jaxblocks.detection.reference import official_soft_nms

CASES = (100, 300, 1000)
QUICK_CASES = (100,)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (n, 2))], 1).astype(np.float32)
    return boxes, rng.uniform(0.01, 1.0, n).astype(np.float32)


def run(quick: bool = False) -> str:
    rows = ["| boxes | NumPy loop | JAX jit | JAX / NumPy | JAX vmap ×8, per image |",
            "|---|---|---|---|---|"]  # fmt: skip
    one = jax.jit(soft_nms)
    batch = jax.jit(jax.vmap(soft_nms))
    for n in QUICK_CASES if quick else CASES:
        boxes, scores = _data(n)
        bj, sj = jnp.asarray(boxes), jnp.asarray(scores)
        bb = jnp.stack([jnp.asarray(_data(n, s)[0]) for s in range(8)])
        sb = jnp.stack([jnp.asarray(_data(n, s)[1]) for s in range(8)])
        out = jax.block_until_ready(one(bj, sj))
        jax.block_until_ready(batch(bb, sb))
        want, _ = official_soft_nms(boxes, scores, plus1=False)
        k = int(out.valid.sum())
        assert np.array_equal(np.asarray(out.indices[:k]), want), "selections differ"
        t_np, t_jax, t_vmap = [], [], []
        for _ in range(3 if quick else 7):  # interleaved
            t0 = time.perf_counter()
            official_soft_nms(boxes, scores, plus1=False)
            t_np.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(one(bj, sj))
            t_jax.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(batch(bb, sb))
            t_vmap.append((time.perf_counter() - t0) / 8)
        a, b, c = (statistics.median(t) for t in (t_np, t_jax, t_vmap))
        rows.append(f"| {n} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {b / a:.2f}× | "
                    f"{c * 1e3:.2f} ms |")  # fmt: skip
    return "\n".join(rows)
