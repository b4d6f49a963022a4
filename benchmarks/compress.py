"""Compression (issue #18): quantisation error and size by scheme, MST operation counts, sparse
1×1 speed, orthogonality. Deterministic figures except the speed table (ratios, one run).

1. Round-to-nearest fake quantisation (`jaxblocks.compress.fake_quant`) of a 512×512 weight with
   heavy-tailed entries (Student-t, 3 degrees of freedom, as LLM weights with outliers): relative
   RMS error and packed size (integers + fp32 scales) against fp32, per bit width and scale
   granularity (tensor, channel, groups of 64, 64×64 blocks): the trade CBQ and BCT build on.
2. MST-compression (paper 29): XNOR/popcount operations of a binary 3×3 conv (64→128 channels,
   32×32 output) evaluated densely vs along the minimum-depth MST of its channels, for random
   sign kernels and for kernels whose channels share structure (each a few flips from one of 8
   prototypes, what the MST regulariser drives training towards).
3. Orthogonal convolutions (paper 50): `lorth_penalty` and `orthogonality_error` of a random
   kernel and of an orthogonal one (a 1×1 orthogonal matrix zero-padded to 3×3).
4. Fast Sparse ConvNets (paper 58): `benchmarks.sparse_conv`'s table, measured in this run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import sparse_conv
from jaxblocks.compress import (
    QuantSpec,
    count_ops,
    fake_quant,
    lorth_penalty,
    mst_plan,
    orthogonality_error,
    quantize,
)

GRANULARITY = {
    "tensor": QuantSpec(granularity="tensor"),
    "channel": QuantSpec(granularity="channel", axis=-1),
    "group 64": QuantSpec(granularity="group", axis=0, group_size=64),
    "block 64×64": QuantSpec(granularity="block", block_shape=(64, 64)),
}


def _quant_table() -> str:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_t(3, (512, 512)).astype(np.float32) * 0.02)
    rms = float(jnp.sqrt(jnp.mean(w**2)))
    rows = [
        "Weight 512×512, Student-t(3) entries; relative RMS error of round-to-nearest, and the "
        "packed size (integers + fp32 scales) as a fraction of fp32.\n",
        "| bits | " + " | ".join(GRANULARITY) + " |",
        "|---|" + "---|" * len(GRANULARITY),
    ]
    for bits in (8, 4, 2):
        cells = []
        for spec in GRANULARITY.values():
            spec = QuantSpec(bits=bits, granularity=spec.granularity, axis=spec.axis,
                             group_size=spec.group_size, block_shape=spec.block_shape)  # fmt: skip
            err = float(jnp.sqrt(jnp.mean((fake_quant(w, spec) - w) ** 2))) / rms
            size = quantize(w, spec).nbytes_packed / (w.size * 4)
            cells.append(f"{err:.4f} / {size:.3f}")
        rows.append(f"| {bits} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _mst_table() -> str:
    rng = np.random.default_rng(1)
    shape = (3, 3, 64, 128)
    random = np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
    protos = np.where(rng.random((3, 3, 64, 8)) < 0.5, -1.0, 1.0)
    structured = protos[..., rng.integers(0, 8, 128)]
    flips = rng.random(shape) < 0.03
    structured = np.where(flips, -structured, structured).astype(np.float32)
    rows = [
        "Binary 3×3 conv, 64→128 channels, 32×32 output positions; operations = XNOR + "
        "popcount-accumulate.\n",
        "| kernel | dense | MST evaluation | ratio | tree depth |",
        "|---|---|---|---|---|",
    ]
    for name, k in (("random signs", random), ("8 prototypes, 3% flips", structured)):
        plan = mst_plan(jnp.asarray(k))
        ops = count_ops(jnp.asarray(k), plan, (32, 32))
        rows.append(f"| {name} | {ops['dense']:.3g} | {ops['mst']:.3g} | {ops['ratio']:.2f}× | "
                    f"{plan.depth} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def _orthogonal_table() -> str:
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    ortho = np.zeros((3, 3, 32, 32), np.float32)
    ortho[1, 1] = q
    random = (rng.standard_normal((3, 3, 32, 32)) / np.sqrt(9 * 32)).astype(np.float32)
    rows = [
        "3×3 kernels, 32→32 channels, stride 1.\n",
        "| kernel | lorth penalty | orthogonality error |",
        "|---|---|---|",
    ]
    for name, k in (("random (He-scaled)", random), ("orthogonal 1×1 padded to 3×3", ortho)):
        k = jnp.asarray(k)
        rows.append(f"| {name} | {float(lorth_penalty(k, 1)):.3g} | "
                    f"{float(orthogonality_error(k, 1)):.3g} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def run(quick: bool = False) -> str:
    jax.config.update("jax_default_matmul_precision", "highest")
    parts = [
        "### Quantisation schemes\n\n" + _quant_table(),
        "### MST-compression operation counts\n\n" + _mst_table(),
        "### Orthogonal convolutions\n\n" + _orthogonal_table(),
        "### Sparse 1×1 convolutions (XLA:CPU)\n\n" + sparse_conv.run(quick),
    ]
    return "\n".join(parts)
