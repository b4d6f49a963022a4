"""MCUNetV2 patch-based inference (arXiv 2110.15352): peak activation memory of the first stage.

MobileNetV2 (width 1.0) at 224², batch 1, fp32, inference: the stage up to ``features_6``
(28×28×32 output, total stride 8) computed on the whole image against tile by tile, for 2×2,
3×3 and 4×4 tiles. Peak memory is XLA's memory analysis of the compiled functions: for the
whole image, temporaries + output of the stage; for the tiles, as on a microcontroller that
runs one tile at a time, the largest tile's temporaries + output plus the stitched output map
that stays allocated. The paper reports 4–8× lower peak memory for its MCUNetV2 backbones; the
halo column is the extra input the tiles compute (the cost the paper's receptive-field
redistribution reduces). Memory figures do not depend on the machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import compile_stats
from jaxblocks.analysis.patch_inference import (
    halo_overhead,
    patch_slices,
    stage_apply,
    trace_geometry,
)
from jaxblocks.registry import create_model

UNTIL = "features_6"


def _bytes(fn, *args) -> int:
    compiled, temp, _ = compile_stats(fn, args)
    out = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(fn, *args)))
    return int(temp or 0) + int(out)


def run(quick: bool = False) -> str:
    size = 96 if quick else 224
    model = create_model("mobilenet_v2")
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

    def stage(v, x):
        return stage_apply(model, v, x, until=UNTIL, train=False)

    geom = trace_geometry(model, variables, x, until=UNTIL, train=False)
    out = jax.eval_shape(stage, variables, x)
    out_bytes = out.size * out.dtype.itemsize
    full = _bytes(stage, variables, x)
    rows = [
        f"MobileNetV2 1.0, {size}², batch 1, fp32; stage up to {UNTIL} "
        f"(output {tuple(out.shape[1:])}, stride {geom.stride[0]}, reach "
        f"{geom.left[0]}+{geom.right[0]} px); peak = XLA temporaries + outputs.\n",
        "| tiles | peak activation memory | vs whole image | halo (input computed / image) |",
        "|---|---|---|---|",
        f"| whole image | {full / 2**20:.2f} MiB | 1.00× | 1.00 |",
    ]
    for n in (2, 3) if quick else (2, 3, 4):
        sl = patch_slices(size, out.shape[1], n, geom.stride[0], geom.left[0], geom.right[0])
        tile = 0
        for (a0, a1), _ in sl:
            for (b0, b1), _ in sl:
                t = jax.ShapeDtypeStruct((1, a1 - a0, b1 - b0, 3), jnp.float32)
                tile = max(tile, _bytes(stage, variables, t))
        peak = tile + out_bytes
        halo = halo_overhead((size, size), tuple(out.shape[1:3]), (n, n), geom)
        rows.append(f"| {n}×{n} | {peak / 2**20:.2f} MiB | {full / peak:.2f}× lower | {halo:.2f} |")
    return "\n".join(rows) + "\n"
