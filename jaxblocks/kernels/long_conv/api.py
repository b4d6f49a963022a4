"""Public entry of the `fft_conv` op: validation, then implementation dispatch.

This module is the op's public face: code outside the op folder imports `fft_conv` and
`BlockSizes` from here (or from the package). The short causal convolution is its own op,
`jaxblocks.kernels.causal_conv1d`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.long_conv import _common, pallas_gpu, pallas_tpu
from jaxblocks.kernels.long_conv._common import BlockSizes as BlockSizes
from jaxblocks.kernels.long_conv.reference import fft_conv_reference
from jaxblocks.kernels.long_conv.xla import fft_conv_xla
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.validation import (
    check_array,
    check_bool,
    check_choice,
    check_positive,
    describe,
)
from jaxblocks.typing import Array, Float

OP = "fft_conv"


def _reference(
    u, k, D=None, pregate=None, postgate=None, *, causal, fft_size, block_sizes, precision
):
    # No blocks: block_sizes is ignored.
    return fft_conv_reference(
        u, k, D, pregate, postgate, causal=causal, fft_size=fft_size, precision=precision
    )


def _xla(u, k, D=None, pregate=None, postgate=None, *, causal, fft_size, block_sizes, precision):
    # No blocks: block_sizes is ignored; no matrix products: XLA's FFT is fp32 at any precision.
    return fft_conv_xla(u, k, D, pregate, postgate, causal=causal, fft_size=fft_size)


# Every entry takes (u, k, *, D, pregate, postgate, causal, fft_size, block_sizes, precision);
# `supports` the same arguments (the FFT-size rule, then each launch's resource estimate).
IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference),
    "xla": Implementation(_xla),
    "pallas_gpu": Implementation(
        pallas_gpu.fft_conv_pallas_gpu, supports=functools.partial(_common.supports, "pallas_gpu")
    ),
    "pallas_tpu": Implementation(
        pallas_tpu.fft_conv_pallas_tpu, supports=functools.partial(_common.supports, "pallas_tpu")
    ),
}

# The Triton Monarch kernel has only been checked in interpret mode and by lowering (no GPU in
# its development): until it is timed against cuFFT it runs when asked for by name, and
# automatic dispatch on a GPU uses XLA's FFT.
_OPT_IN = ("pallas_gpu",)


def fft_conv(
    u: Float[Array, "B H L"],
    k: Float[Array, "H Lk"],
    *,
    D: Float[Array, " H"] | None = None,
    pregate: Float[Array, "B H L"] | None = None,
    postgate: Float[Array, "B H L"] | None = None,
    causal: bool = True,
    fft_size: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    check_finite: bool = False,
    precision: str = "highest",
) -> Float[Array, "B H L"]:
    """Long convolution by FFT (safari / FlashFFTConv, https://arxiv.org/abs/2311.05908).

    ``y = postgate ⊙ (conv(pregate ⊙ u, k) + D ⊙ u)`` with one kernel per channel, the
    convolution causal (linear; the FFT size N ≥ L + Lk − 1, by default the next power of two,
    i.e. N ≥ 2L for Lk = L) or, with ``causal=False``, circular with period N = ``fft_size``
    (default L). Unlike the short `jaxblocks.kernels.causal_conv1d.causal_conv1d`, the kernel
    may be as long as the sequence.

    Args:
      u: input [B, H, L] (fp32, bf16 or fp16); the output has its dtype.
      k: kernels [H, Lk], Lk ≤ L (kept and used in fp32).
      D: optional skip [H]. pregate, postgate: optional gates shaped like ``u``.
      causal: linear causal convolution (True) or circular of period ``fft_size`` (False).
      fft_size: N; causal: ≥ L + Lk − 1; circular: ≥ L (Pallas kernels: a power of two in
        [256, 65536], on a GPU at most 4096 (one row per program must fit its registers); a
        smaller causal N is raised to 256 inside, which is exact).
      implementation: None (automatic: "pallas_tpu" on TPU when the FFT size fits, else "xla";
        the Triton kernel is opt-in), "reference", "xla", "pallas_gpu" or "pallas_tpu".
      block_sizes: launch parameters of the Pallas kernels (`BlockSizes`: Triton warps and
        stages, the Mosaic VMEM limit; every block is one full row); None takes the defaults.
        The reference and xla implementations have no blocks and ignore it.
      check_finite: guard against non-finite inputs (see below). Off by default: it costs an
        extra pass over the inputs (and, outside ``jit``, a device-to-host copy).
      precision: "highest" (default) or "tf32", the precision of the matrix products
        (`jaxblocks.kernels.precision`): the Pallas kernels' Monarch DFT matmuls (fp32 operands:
        IEEE fp32 FMAs on a GPU, multi-pass bf16 on the MXU; "tf32": TF32 tensor cores /
        single-pass bf16, ~1e-3 relative error) and the reference's direct convolution. The
        ``xla`` path has no matrix products (XLA's FFT is fp32 either way).

    Non-finite values: the FFT mixes every time step of a channel, so one NaN or inf anywhere in
    ``u`` (or ``pregate``, or ``k``) makes the *whole* channel's output NaN, earlier times
    included: causality does not hold for non-finite inputs in any implementation (the direct
    ``reference`` sum included, which turns the NaN's lags into NaN through 0 · inf). With
    ``check_finite=True``: concrete inputs (outside ``jit``) holding a non-finite value raise a
    ValueError naming the argument and the first such index; traced inputs are computed with the
    non-finite values replaced by 0 and the outputs from each channel's first non-finite time
    onward (causal) set to NaN, so earlier outputs are exact. For ``causal=False`` (circular)
    every output of such a channel is NaN.

    Returns:
      y: [B, H, L] in ``u.dtype``.

    Example:
      >>> u = jnp.ones((2, 4, 100)); k = jnp.ones((4, 100)) / 100
      >>> fft_conv(u, k, D=jnp.ones((4,))).shape
      (2, 4, 100)
    """
    op = OP
    check_array(op, "u", u, ndim=3)
    B, H, L = u.shape
    if L == 0:
        raise ValueError(f"{op}: u must have a non-empty sequence axis L, got {describe(u)}")
    check_array(op, "k", k, shape=(H, None))
    Lk = k.shape[1]
    if not 1 <= Lk <= L:
        raise ValueError(
            f"{op}: k must have shape (H={H}, Lk) with 1 <= Lk <= L={L}, got {describe(k)}"
        )
    if D is not None:
        check_array(op, "D", D, shape=(H,))
    for name, g in (("pregate", pregate), ("postgate", postgate)):
        if g is not None:
            check_array(op, name, g, shape=(B, H, L))
    check_bool(op, "causal", causal)
    if fft_size is None:
        fft_size = _common.default_fft_size(L, Lk, causal)
    check_positive(op, "fft_size", fft_size)
    if causal and fft_size < L + Lk - 1:
        raise ValueError(
            f"{op}: fft_size={fft_size} < L + Lk - 1 = {L + Lk - 1} wraps the causal convolution "
            f"around; use fft_size >= {L + Lk - 1} or causal=False for a circular convolution"
        )
    if not causal and fft_size < L:
        raise ValueError(f"{op}: circular fft_size={fft_size} must be >= L={L}")
    check_choice(op, "implementation", implementation, (None, *IMPLEMENTATIONS))
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{op}: block_sizes must be None or a jaxblocks.kernels.long_conv.BlockSizes, "
            f"got {type(block_sizes).__name__}"
        )
    check_bool(op, "check_finite", check_finite)
    prec = resolve_precision(op, precision)
    if check_finite:
        _raise_on_concrete_non_finite(op, u=u, k=k, D=D, pregate=pregate, postgate=postgate)
        conv_in = u if pregate is None else pregate * u
        bad_u = ~jnp.isfinite(conv_in)  # [B, H, L]
        bad_k = ~jnp.isfinite(k)  # [H, Lk]
        u = jnp.where(~jnp.isfinite(u), jnp.zeros_like(u), u)
        k = jnp.where(bad_k, jnp.zeros_like(k), k)
        if pregate is not None:
            pregate = jnp.where(~jnp.isfinite(pregate), jnp.zeros_like(pregate), pregate)
    kw = dict(
        D=D,
        pregate=pregate,
        postgate=postgate,
        causal=bool(causal),
        fft_size=fft_size,
        block_sizes=block_sizes,
        precision=prec,
    )
    impls = IMPLEMENTATIONS
    if implementation is None:
        impls = {name: impl for name, impl in IMPLEMENTATIONS.items() if name not in _OPT_IN}
    _, fn = select_implementation(op, implementation, impls, u, k, **kw)
    y = fn(u, k, **kw)
    if check_finite:
        t = jnp.arange(L)
        if causal:  # an output depends on inputs at or before its time (and on k's lags <= t)
            first_u = jnp.min(jnp.where(bad_u, t, L), axis=-1)  # [B, H]
            first_k = jnp.min(jnp.where(bad_k, jnp.arange(Lk), L), axis=-1)  # [H]
            first = jnp.minimum(first_u, first_k[None, :])[..., None]  # [B, H, 1]
            poisoned = t[None, None, :] >= first
        else:  # circular: every output of the channel mixes every input
            poisoned = jnp.broadcast_to(
                (bad_u.any(-1) | bad_k.any(-1)[None, :])[..., None], y.shape
            )
        y = jnp.where(poisoned, jnp.full_like(y, jnp.nan), y)
    return y


def _raise_on_concrete_non_finite(op: str, **arrays) -> None:
    """Outside ``jit``: a ValueError naming the argument and index of the first non-finite."""
    for name, a in arrays.items():
        if a is None or isinstance(a, jax.core.Tracer):
            continue
        arr = np.asarray(a)
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            i = tuple(int(v) for v in bad[0])
            raise ValueError(
                f"{op}: {name} has a non-finite value {arr[i].item()!r} at index {i} "
                "(check_finite=True)"
            )
