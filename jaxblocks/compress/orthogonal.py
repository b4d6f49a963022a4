"""Orthogonal convolutions — Achour, Malgouyres, Mamalet, "Existence, Stability and Scalability
of Orthogonal Convolutional Neural Networks", JMLR 2022, https://arxiv.org/abs/2108.05623
(reference code: deel-ai/deel-lip ``deel/lip/regularizers.py``, ``LorthRegularizer``).

A convolution with kernel K (``[k, k, C, M]``, Flax's HWIO layout) and stride S is orthogonal
when its linear map A is row-orthogonal (A Aᵀ = I, possible when M ≤ S²C) or column-orthogonal
(Aᵀ A = I, when M > S²C). Both are measured by one small convolution of the kernel with
itself: with P = ⌊(k − 1)/S⌋·S,

    L_orth(K) = ‖conv(K, K; padding P, stride S) − I_r0‖²_F − max(0, M − S²C),

where I_r0 holds the M×M identity at the spatial centre. L_orth = 0 exactly when the circular
convolution is orthogonal, and L_orth equals ‖A Aᵀ − I‖²_F (row case) or ‖Aᵀ A − I‖²_F
(column case) divided by the number of output positions of a large enough circular input
(the tests check this against the explicit operator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["lorth_penalty", "check_orthogonal_conv_exists", "conv_operator", "orthogonality_error"]


def _shape(fn: str, kernel: Array, stride: object) -> tuple[int, int, int, int]:
    if getattr(kernel, "ndim", None) != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"{fn}: kernel must be a square 2-D conv kernel [k, k, C_in, C_out] (Flax HWIO), "
            f"got shape {getattr(kernel, 'shape', type(kernel).__name__)}"
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{fn}: stride must be a positive int, got {stride!r}")
    k, _, c, m = kernel.shape
    return k, c, m, stride


def check_orthogonal_conv_exists(kernel_shape: tuple[int, ...], stride: int) -> None:
    """Raise when no orthogonal convolution of this shape and stride exists (Achour et al.,
    Theorem 1): row case (M ≤ S²C) needs M ≤ k²C; column case (M > S²C) needs S ≤ k."""
    k, _, c, m = kernel_shape
    if m <= stride * stride * c:
        if m > c * k * k:
            raise ValueError(
                f"lorth: no row-orthogonal conv with kernel {tuple(kernel_shape)} at stride "
                f"{stride}: C_out={m} > k²·C_in={c * k * k}"
            )
    elif stride > k:
        raise ValueError(
            f"lorth: no column-orthogonal conv with kernel {tuple(kernel_shape)} at stride "
            f"{stride}: the stride exceeds the kernel size {k}"
        )


def lorth_penalty(kernel: Float[Array, "k k C M"], stride: int = 1) -> Float[Array, ""]:
    """L_orth of a conv kernel (Achour et al., https://arxiv.org/abs/2108.05623), fp32 scalar.

    Odd and even kernel sizes; 0 for an orthogonal convolution, positive otherwise. Multiply by
    λ and add it to the loss (the trainer's ``regularizers.lorth_weight``).

    Args:
      kernel: ``[k, k, C_in, C_out]`` (Flax's ``nn.Conv`` kernel).
      stride: the convolution's stride S.

    Example:
      >>> q = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (8, 8)))[0]
      >>> kernel = jnp.zeros((3, 3, 8, 8)).at[1, 1].set(q)  # centre tap orthogonal
      >>> float(lorth_penalty(kernel)) < 1e-10
      True
    """
    k, c, m, s = _shape("lorth_penalty", kernel, stride)
    check_orthogonal_conv_exists(kernel.shape, s)
    w = kernel.astype(jnp.float32)
    p = ((k - 1) // s) * s
    # Each output channel's kernel is an "image" [M, k, k, C]; correlate it with every kernel.
    images = jnp.pad(jnp.transpose(w, (3, 0, 1, 2)), ((0, 0), (p, p), (p, p), (0, 0)))
    out = jax.lax.conv_general_dilated(
        images, w, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # [M, n, n, M] with n = 2P/S + 1 (odd), the centre is shift 0  # fmt: skip
    n = out.shape[1]
    target = jnp.zeros_like(out).at[:, n // 2, n // 2, :].set(jnp.eye(m, dtype=out.dtype))
    delta = max(0, m - s * s * c)
    return jnp.sum(jnp.square(out - target)) - delta


def conv_operator(kernel: np.ndarray, stride: int, size: int) -> np.ndarray:
    """The matrix of the circular convolution of a ``size``×``size``×C input with ``kernel`` at
    ``stride`` (``size`` a multiple of the stride): ``[(size/S)²·M, size²·C]``, NumPy float64.

    Built entry by entry (no FFT, no conv routine), for tests and small audits.
    """
    kernel = np.asarray(kernel, np.float64)
    k, _, c, m = kernel.shape
    if size % stride:
        raise ValueError(f"conv_operator: size={size} not divisible by stride={stride}")
    n = size // stride
    a = np.zeros((n, n, m, size, size, c))
    for p in range(n):
        for q in range(n):
            for i in range(k):
                for j in range(k):
                    a[p, q, :, (p * stride + i) % size, (q * stride + j) % size, :] += kernel[
                        i, j
                    ].T
    return a.reshape(n * n * m, size * size * c)


def orthogonality_error(kernel: np.ndarray, stride: int = 1, size: int | None = None) -> float:
    """max |σ − 1| over the singular values of the circular convolution's matrix (`conv_operator`,
    input ``size`` defaults to the smallest multiple of the stride ≥ 2k), counting only the
    min(rows, cols) singular values an orthogonal map has at 1. 0 for an orthogonal conv."""
    k, c, m, s = _shape("orthogonality_error", np.asarray(kernel), stride)
    size = size or s * -(-2 * k // s)
    sv = np.linalg.svd(conv_operator(np.asarray(kernel), s, size), compute_uv=False)
    return float(np.max(np.abs(sv - 1.0)))
