"""MCUNetV2 patch-based inference (arXiv 2110.15352): peak activation memory of the first stage.

MobileNetV2 (width 1.0) at 224², batch 1, fp32, inference: the stage up to ``features_6``
(28×28×32 output, total stride 8) computed on the whole image against tile by tile, for 2×2,
3×3 and 4×4 tiles. Peak memory is XLA's memory analysis of the compiled functions: for the
whole image, temporaries + output of the stage; for the tiles, as on a microcontroller that
runs one tile at a time, the largest tile's temporaries + output plus the stitched output map
that stays allocated. The paper reports 4–8× lower peak memory for its MCUNetV2 backbones; the
halo column is the extra input the tiles compute (the cost the paper's receptive-field
redistribution reduces). Memory figures do not depend on the machine.

A second table does the same for the MCUNet model-zoo presets (`jaxblocks.models.mcunet`) at
their published resolutions, each with and without MCUNetV2's receptive-field redistribution
(``redistribute_rf=True``), the patch stage ending at stride 8 (`patch_stage_end`); its
last column is the halo's extra compute: XLA FLOPs of all tiles minus the whole-image stage,
over the whole network's FLOPs (the paper's "computation overhead").
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
from jaxblocks.models.mcunet import patch_stage_end
from jaxblocks.registry import create_model

UNTIL = "features_6"
MCUNET = ("mcunet_in1", "mcunet_in2", "mcunet_in3", "mcunet_in4")
QUICK_MCUNET = ("mcunet_in1",)
MCUNET_PATCHES = (2, 3, 4)
QUICK_MCUNET_PATCHES = (2,)


def _bytes(fn, *args) -> int:
    return _stats(fn, *args)[0]


def _stats(fn, *args) -> tuple[int, float]:
    """(XLA temporaries + outputs in bytes, XLA FLOPs) of ``jit(fn)(*args)``."""
    compiled, temp, flops = compile_stats(fn, args)
    out = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(fn, *args)))
    return int(temp or 0) + int(out), float(flops or 0.0)


def _zeros(model, x):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)


def mcunet_table(names=MCUNET, patches=MCUNET_PATCHES, size: int | None = None, **overrides) -> str:
    """Peak memory and halo cost of the MCUNet presets' patch stage, with and without RF
    redistribution (``size``: input resolution instead of each preset's; ``overrides``: model
    kwargs, e.g. a smaller width for tests)."""
    rows = [
        "| model | RF redistributed | input | patch stage (output, reach) | whole-image peak "
        "| tiles | tile peak | vs whole image | halo (input computed / image) "
        "| extra compute (of the network) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for rd in (False, True):
            model = create_model(name, redistribute_rf=rd, **overrides)
            res = size or model.resolution
            x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
            variables = _zeros(model, x)
            until = patch_stage_end(model)

            def stage(v, x, model=model, until=until):
                return stage_apply(model, v, x, until=until, train=False)

            side = 64 * -(-res // 64)  # divisible by every stride, as trace_geometry needs
            probe = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
            geom = trace_geometry(model, variables, probe, until=until, train=False)
            out = jax.eval_shape(stage, variables, x)
            out_bytes = out.size * out.dtype.itemsize
            full, stage_flops = _stats(stage, variables, x)
            _, net_flops = _stats(lambda v, x, m=model: m.apply(v, x, train=False), variables, x)
            cache: dict[tuple[int, int], tuple[int, float]] = {}
            for n in patches:
                sl = patch_slices(res, out.shape[1], n, geom.stride[0], geom.left[0],
                                  geom.right[0])  # fmt: skip
                tile, tile_flops = 0, 0.0
                for (a0, a1), _ in sl:
                    for (b0, b1), _ in sl:
                        hw = (a1 - a0, b1 - b0)
                        if hw not in cache:
                            t = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
                            cache[hw] = _stats(stage, variables, t)
                        tile = max(tile, cache[hw][0])
                        tile_flops += cache[hw][1]
                peak = tile + out_bytes
                halo = halo_overhead((res, res), tuple(out.shape[1:3]), (n, n), geom)
                extra = (tile_flops - stage_flops) / net_flops if net_flops else float("nan")
                rows.append(
                    f"| {name} | {'yes' if rd else 'no'} | {res}² | {until} "
                    f"{tuple(out.shape[1:])}, {geom.left[0]}+{geom.right[0]} px "
                    f"| {full / 2**10:.0f} KiB | {n}×{n} | {peak / 2**10:.0f} KiB "
                    f"| {full / peak:.2f}× lower | {halo:.2f} | +{100 * extra:.1f}% |"
                )
    return "\n".join(rows) + "\n"


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
    rows.append(
        "\nMCUNet presets (mit-han-lab/mcunet zoo) at their resolutions, batch 1, fp32; patch "
        "stage up to stride 8; with and without MCUNetV2's receptive-field redistribution.\n"
    )
    rows.append(
        mcunet_table(
            QUICK_MCUNET if quick else MCUNET, QUICK_MCUNET_PATCHES if quick else MCUNET_PATCHES
        ).rstrip("\n")
    )
    return "\n".join(rows) + "\n"
