"""Sparse 1×1 convolutions for inference (Elsen et al., "Fast Sparse ConvNets", arXiv 1911.09723).

The paper makes the 1×1 convolutions of MobileNets 70–95 % sparse by gradual magnitude pruning
(`jaxblocks.compress.prune`, with ``block=(1, b)`` for its 1×b blocks of output channels, the
first convolution and the classifier left dense) and runs them as sparse × dense matrix products
on phone CPUs (XNNPACK's SpMM). This module is the JAX side of that inference path:

* `to_block_sparse` turns a pruned ``[C_in, C_out]`` (or ``[1, 1, C_in, C_out]``) kernel into a
  `BlockSparseKernel`: the non-zero 1×b blocks of output channels, one input channel each.
* `block_sparse_pointwise` applies it to channels-last activations: gather the input channel of
  every block, scale by the block's b weights, segment-sum into the output blocks. Its work is
  ``2·M·nnz`` multiply-adds instead of ``2·M·C_in·C_out``.
* `ell_pointwise` stores each output block's non-zero input channels padded to the longest row
  (ELLPACK): one gather and a batched contraction, no scatter.
* `bcoo_pointwise` does the same through `jax.experimental.sparse.BCOO` (XLA's generic sparse
  dot), for comparison.

XLA has no SpMM kernel: on CPU both are gathers and scatters that a dense GEMM beats until very
high sparsity. ``python -m benchmarks.run sparse_conv`` measures where (if anywhere) they win on
this machine; the paper's speed-ups come from hand-written ARM kernels this module does not have.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from jaxblocks.typing import Array, Float

__all__ = [
    "BlockSparseKernel",
    "bcoo_pointwise",
    "block_sparse_pointwise",
    "ell_layout",
    "ell_pointwise",
    "pointwise_flops",
    "to_block_sparse",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseKernel:
    """The non-zero 1×b blocks of a ``[C_in, C_out]`` kernel.

    Attributes:
      values: ``[nnz, b]`` the blocks' weights.
      col: ``[nnz]`` int32, the input channel of each block.
      row_block: ``[nnz]`` int32, the output block of each block (channels
        ``row_block·b … row_block·b + b − 1``).
      c_in, c_out, block: the dense shape and the block width b (static).
    """

    values: Array
    col: Array
    row_block: Array
    c_in: int = dataclasses.field(metadata=dict(static=True))
    c_out: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        return self.nnz_blocks * self.block / (self.c_in * self.c_out)

    def to_dense(self) -> Array:
        """The ``[C_in, C_out]`` kernel (zeros where no block is stored)."""
        dense = jnp.zeros((self.c_in, self.c_out // self.block, self.block), self.values.dtype)
        dense = dense.at[self.col, self.row_block].set(self.values)
        return dense.reshape(self.c_in, self.c_out)


def _as_matrix(kernel: Array, who: str) -> np.ndarray:
    k = np.asarray(kernel)
    if k.ndim == 4:
        if k.shape[:2] != (1, 1):
            raise ValueError(
                f"{who}: a conv kernel must be 1×1 ([1, 1, C_in, C_out]), got {k.shape}"
            )
        k = k[0, 0]
    if k.ndim != 2:
        raise ValueError(
            f"{who}: kernel must be [C_in, C_out] or [1, 1, C_in, C_out], got {k.shape}"
        )
    return k


def to_block_sparse(kernel: Array, block: int = 1) -> BlockSparseKernel:
    """Store the non-zero 1×``block`` blocks (along output channels) of a pruned 1×1 kernel.

    Runs on the host (the number of blocks sets the shapes). A block is stored when any of its
    weights is non-zero, so a kernel pruned with ``magnitude_mask(..., block=(1, block))`` keeps
    exactly its surviving blocks.

    Args:
      kernel: ``[C_in, C_out]`` or ``[1, 1, C_in, C_out]`` (Flax's conv layout).
      block: b, a divisor of C_out.

    Example::

        sk = to_block_sparse(pruned_kernel, block=4)
        y = block_sparse_pointwise(x, sk)  # == x @ pruned_kernel
    """
    k = _as_matrix(kernel, "to_block_sparse")
    c_in, c_out = k.shape
    if not isinstance(block, int) or block < 1 or c_out % block:
        raise ValueError(f"to_block_sparse: block={block!r} must be a positive divisor of "
                         f"C_out={c_out} (kernel shape {k.shape})")  # fmt: skip
    blocks = k.reshape(c_in, c_out // block, block)
    col, row = np.nonzero(np.any(blocks != 0, axis=-1))  # row-major: sorted by input channel
    return BlockSparseKernel(
        values=jnp.asarray(blocks[col, row]),
        col=jnp.asarray(col, jnp.int32),
        row_block=jnp.asarray(row, jnp.int32),
        c_in=c_in,
        c_out=c_out,
        block=block,
    )


def block_sparse_pointwise(
    x: Float[Array, "*B Cin"], sk: BlockSparseKernel
) -> Float[Array, "*B Cout"]:
    """``x @ kernel`` for a `BlockSparseKernel`: gather, scale, segment-sum (jittable).

    Args:
      x: channels-last activations ``[..., C_in]``.
      sk: from `to_block_sparse`.

    Returns:
      ``[..., C_out]`` in the promoted dtype of ``x`` and the values, accumulated in fp32.
    """
    if x.ndim < 1 or x.shape[-1] != sk.c_in:
        raise ValueError(f"block_sparse_pointwise: x has shape {x.shape}; expected the last axis "
                         f"to be C_in={sk.c_in}")  # fmt: skip
    lead = x.shape[:-1]
    out_dtype = jnp.result_type(x.dtype, sk.values.dtype)
    xm = x.reshape(-1, sk.c_in).astype(jnp.float32)  # [M, C_in]
    if sk.nnz_blocks == 0:
        return jnp.zeros((*lead, sk.c_out), out_dtype)
    g = xm[:, sk.col].T  # [nnz, M]: each block's input channel
    prod = g[:, :, None] * sk.values.astype(jnp.float32)[:, None, :]  # [nnz, M, b]
    n_rb = sk.c_out // sk.block
    y = jax.ops.segment_sum(prod, sk.row_block, num_segments=n_rb)  # [C_out/b, M, b]
    y = jnp.transpose(y, (1, 0, 2)).reshape(-1, sk.c_out)  # [M, C_out]
    return y.reshape(*lead, sk.c_out).astype(out_dtype)


def ell_pointwise(x: Float[Array, "*B Cin"], sk: BlockSparseKernel) -> Float[Array, "*B Cout"]:
    """``x @ kernel`` in ELLPACK form: every output block keeps its non-zero input channels padded
    to the longest row, so the product is one gather and a batched contraction (no scatter).

    Builds the padded layout on the host from ``sk`` (call outside `jax.jit` on a concrete
    kernel, or close over it). Padding costs ``(max row − mean row) / max row`` of the work.
    """
    if x.ndim < 1 or x.shape[-1] != sk.c_in:
        raise ValueError(f"ell_pointwise: x has shape {x.shape}; expected the last axis to be "
                         f"C_in={sk.c_in}")  # fmt: skip
    idx, vals = ell_layout(sk)
    lead = x.shape[:-1]
    xm = x.reshape(-1, sk.c_in).astype(jnp.float32)  # [M, C_in]
    g = xm[:, idx]  # [M, C_out/b, W]
    y = jnp.einsum("mrw,rwb->mrb", g, vals, precision="highest")  # [M, C_out/b, b]
    out_dtype = jnp.result_type(x.dtype, sk.values.dtype)
    return y.reshape(*lead, sk.c_out).astype(out_dtype)


def ell_layout(sk: BlockSparseKernel) -> tuple[Array, Array]:
    """``(idx [C_out/b, W] int32, values [C_out/b, W, b])``: each output block's input channels
    and weights, padded with channel 0 and zero weights to the longest row W (host-side)."""
    col, row = np.asarray(sk.col), np.asarray(sk.row_block)
    values = np.asarray(sk.values, np.float32)
    n_rb = sk.c_out // sk.block
    counts = np.bincount(row, minlength=n_rb)
    width = max(int(counts.max(initial=0)), 1)
    idx = np.zeros((n_rb, width), np.int32)
    vals = np.zeros((n_rb, width, sk.block), np.float32)
    order = np.argsort(row, kind="stable")
    slot = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    idx[row[order], slot] = col[order]
    vals[row[order], slot] = values[order]
    return jnp.asarray(idx), jnp.asarray(vals)


def bcoo_pointwise(x: Float[Array, "*B Cin"], kernel: Array) -> Float[Array, "*B Cout"]:
    """``x @ kernel`` with the kernel as a `jax.experimental.sparse.BCOO` matrix (host-side
    conversion: call it on a concrete kernel, then jit over ``x`` with the BCOO closed over or
    passed in)."""
    k = kernel if isinstance(kernel, sparse.BCOO) else sparse.BCOO.fromdense(
        jnp.asarray(_as_matrix(kernel, "bcoo_pointwise"))
    )  # fmt: skip
    if x.ndim < 1 or x.shape[-1] != k.shape[0]:
        raise ValueError(f"bcoo_pointwise: x has shape {x.shape}; expected the last axis to be "
                         f"C_in={k.shape[0]}")  # fmt: skip
    lead = x.shape[:-1]
    y = (k.T @ x.reshape(-1, k.shape[0]).T).T  # sparse [C_out, C_in] @ dense [C_in, M]
    return y.reshape(*lead, k.shape[1])


def pointwise_flops(m: int, c_in: int, c_out: int, density: float = 1.0) -> float:
    """Multiply-add FLOPs (2 per MAC) of a 1×1 convolution over ``m`` pixels at ``density``."""
    return 2.0 * m * c_in * c_out * density
