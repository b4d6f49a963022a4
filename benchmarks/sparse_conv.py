"""Sparse 1×1 convolutions (Fast Sparse ConvNets, arXiv 1911.09723) against the dense GEMM, on CPU.

One MobileNet-sized 1×1 layer (56×56 pixels, batch 1, 128→128 channels) pruned by magnitude at
70–95 % with 1×1 and 1×4 blocks (the paper's range), four ways side by side: the dense kernel
with its zeros (``x @ W``), `block_sparse_pointwise` (gather, scale, segment-sum),
`ell_pointwise` (padded rows: gather and contract) and `bcoo_pointwise`
(`jax.experimental.sparse`). Times are medians of interleaved runs; the ratio is sparse /
dense (below 1 means the sparse path is faster). XLA has no SpMM kernel, so this reports what
XLA:CPU does with the paper's sparsity, not what XNNPACK's ARM kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import interleaved_medians
from jaxblocks.compress import magnitude_mask
from jaxblocks.compress.sparse_conv import (
    bcoo_pointwise,
    block_sparse_pointwise,
    ell_layout,
    to_block_sparse,
)

HW, C = 56 * 56, 128
CASES = tuple((s, b) for b in (1, 4) for s in (0.7, 0.8, 0.9, 0.95))
QUICK_CASES = ((0.9, 1), (0.9, 4))


def _functions(x, k, sk, bcoo):
    dense = jax.jit(lambda x, k: x @ k)
    ours = jax.jit(block_sparse_pointwise)
    theirs = jax.jit(bcoo_pointwise)
    idx, vals = ell_layout(sk)

    @jax.jit
    def ell(x, idx, vals):  # [M, C_in] -> [M, C_out]: gather + batched contraction
        y = jnp.einsum("mrw,rwb->mrb", x[:, idx], vals, precision="highest")
        return y.reshape(x.shape[0], -1)

    return {
        "dense": lambda: dense(x, k),
        "ours": lambda: ours(x, sk),
        "bcoo": lambda: theirs(x, bcoo),
        "ell": lambda: ell(x, idx, vals),
    }


def run(quick: bool = False) -> str:
    x = jax.random.normal(jax.random.key(0), (HW, C))
    k0 = jax.random.normal(jax.random.key(1), (C, C))
    rows = [
        f"1×1 conv, {HW} pixels × {C}→{C} channels, fp32, XLA:CPU; time relative to dense "
        "(median of interleaved runs).\n",
        "| sparsity | block | stored density | dense | block-sparse (gather/segment-sum) | ELL "
        "(padded rows) | BCOO |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity, block in QUICK_CASES if quick else CASES:
        k = k0 * magnitude_mask(k0, sparsity, (1, block))
        sk = to_block_sparse(k, block)
        bcoo = jax.experimental.sparse.BCOO.fromdense(k)
        fns = _functions(x, k, sk, bcoo)
        want = fns["dense"]()
        for name in ("ours", "ell", "bcoo"):
            err = float(jnp.max(jnp.abs(fns[name]() - want)))
            assert err < 1e-3, f"{name} differs from dense by {err}"
        t = interleaved_medians(fns, 5 if quick else 15)
        rows.append(
            f"| {sparsity:.0%} | 1×{block} | {sk.density:.3f} | 1.00 | "
            f"{t['ours'] / t['dense']:.2f}× | {t['ell'] / t['dense']:.2f}× | "
            f"{t['bcoo'] / t['dense']:.2f}× |"
        )
    return "\n".join(rows) + "\n"
