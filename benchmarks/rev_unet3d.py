"""Reversible MBConv 3-D U-Net: training-step memory against the same network with autodiff.

Pendse et al. (arXiv 2009.06835) report that reversible stages fit 3× larger volumes (or 25 %
more depth, or 2× channels) in a fixed memory budget. Here `rev_mbconv_unet3d` (widths 16–128,
2 or 4 couplings per stage, 4 input channels, batch 1) is compiled for ``value_and_grad`` of a
cross-entropy loss, reversible and not, and XLA's temporary memory of the compiled step
(`compiled.memory_analysis().temp_size_in_bytes`) is read side by side; then the largest cube
whose reversible step fits the memory of the autodiff step at the reference size is found.
Nothing is executed: the figures are XLA:CPU's buffer assignment, not a run's peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxblocks.registry import create_model

SIZES = (16, 32, 48)
QUICK_SIZES = (16, 32)


def _temp_bytes(reversible: bool, size: int, blocks: int = 2) -> int:
    model = create_model("rev_mbconv_unet3d", reversible=reversible, blocks=blocks)
    x = jax.ShapeDtypeStruct((1, size, size, size, 4), jnp.float32)
    y = jax.ShapeDtypeStruct((1, size, size, size), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x, y).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def run(quick: bool = False) -> str:
    sizes = QUICK_SIZES if quick else SIZES
    rows = [
        "`rev_mbconv_unet3d` (widths 16/32/64/128), batch 1, 4 channels, fp32, value_and_grad; "
        "XLA:CPU temp memory of the compiled step.\n",
        "| cube | couplings per stage | autodiff | reversible | reversible / autodiff |",
        "|---|---|---|---|---|",
    ]
    for blocks in (2, 4):
        for s in sizes:
            a, r = _temp_bytes(False, s, blocks), _temp_bytes(True, s, blocks)
            rows.append(f"| {s}³ | {blocks} | {a / 2**20:.1f} MiB | {r / 2**20:.1f} MiB | "
                        f"{r / a:.2f}× |")  # fmt: skip
    ref, blocks = 32, 4
    budget = _temp_bytes(False, ref, blocks)
    best = ref
    for s in range(ref + 8, 8 * ref, 8):  # D, H, W must be multiples of 8
        if _temp_bytes(True, s, blocks) > budget:
            break
        best = s
    rows.append(
        f"\nIn the autodiff step's memory at {ref}³ with {blocks} couplings per stage "
        f"({budget / 2**20:.1f} MiB) the reversible network trains a {best}³ cube: "
        f"{(best / ref) ** 3:.2f}× the voxels (cube sides in steps of 8)."
    )
    return "\n".join(rows) + "\n"
