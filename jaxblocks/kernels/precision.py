"""The ``precision=`` argument every op takes, and what it means on each backend.

``precision="highest"`` (every op's default): fp32 operands of the kernels' matrix products are
multiplied in full fp32 — IEEE fp32 FMAs on a GPU (Triton ``input_precision="ieee"``), the
multi-pass bf16 algorithm on a TPU (``lax.Precision.HIGHEST``), plain fp32 in XLA.
``precision="tf32"``: fp32 operands go through TF32 tensor cores on Ampere and later GPUs
(Triton ``input_precision="tf32"``; about 10 mantissa bits) and single-pass bf16 on a TPU
(``lax.Precision.DEFAULT``); faster, about 1e-3 relative error per product. bf16 operands are
multiplied exactly (with fp32 accumulation) under either setting.

Pass the resolved `jax.lax.Precision` to every ``jnp.dot``/``jnp.einsum`` inside a kernel and to
the XLA path's products, so the implementations agree on what they compute.
"""

from __future__ import annotations

from jax import lax

__all__ = ["PRECISIONS", "resolve_precision"]

PRECISIONS: dict[str, lax.Precision] = {
    "highest": lax.Precision.HIGHEST,
    "tf32": lax.Precision.DEFAULT,
}


def resolve_precision(op: str, precision: object) -> lax.Precision:
    """The `jax.lax.Precision` for ``precision`` (a key of `PRECISIONS`), or a clear error."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]
