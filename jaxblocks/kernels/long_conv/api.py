"""Public entry points: `fft_conv` and `causal_conv1d` (validation, then dispatch)."""

from __future__ import annotations

from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.long_conv import pallas_gpu, pallas_tpu, reference, xla
from jaxblocks.kernels.validation import check_array, check_choice, check_positive, describe
from jaxblocks.typing import Array, Float

_FFT_IMPLS = {
    "reference": Implementation(reference.fft_conv_reference),
    "xla": Implementation(xla.fft_conv_xla),
    "pallas_gpu": Implementation(
        pallas_gpu.fft_conv_pallas_gpu, supports=pallas_gpu.supports_fft_conv
    ),
    "pallas_tpu": Implementation(
        pallas_tpu.fft_conv_pallas_tpu, supports=pallas_tpu.supports_fft_conv
    ),
}

# The Triton Monarch kernel has only been checked in interpret mode and by lowering (no GPU in
# its development): until it is timed against cuFFT it runs when asked for by name, and
# automatic dispatch on a GPU uses XLA's FFT.
_FFT_AUTO_IMPLS = {name: impl for name, impl in _FFT_IMPLS.items() if name != "pallas_gpu"}

_SHORT_IMPLS = {
    "reference": Implementation(reference.causal_conv1d_reference),
    "xla": Implementation(xla.causal_conv1d_xla),
    "pallas_gpu": Implementation(pallas_gpu.causal_conv1d_pallas_gpu),
    "pallas_tpu": Implementation(pallas_tpu.causal_conv1d_pallas_tpu),
}

MAX_SHORT_TAPS = 8
_ACTIVATIONS = (None, "silu", "swish")


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


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
) -> Float[Array, "B H L"]:
    """Long convolution by FFT (safari / FlashFFTConv, https://arxiv.org/abs/2311.05908).

    ``y = postgate ⊙ (conv(pregate ⊙ u, k) + D ⊙ u)`` with one kernel per channel, the
    convolution causal (linear; the FFT size N ≥ L + Lk − 1, by default the next power of two,
    i.e. N ≥ 2L for Lk = L) or, with ``causal=False``, circular with period N = ``fft_size``
    (default L). Unlike a short `causal_conv1d`, the kernel may be as long as the sequence.

    Args:
      u: input [B, H, L] (fp32, bf16 or fp16); the output has its dtype.
      k: kernels [H, Lk], Lk ≤ L (kept and used in fp32).
      D: optional skip [H]. pregate, postgate: optional gates shaped like ``u``.
      causal: linear causal convolution (True) or circular of period ``fft_size`` (False).
      fft_size: N; causal: ≥ L + Lk − 1; circular: ≥ L (Pallas kernels: a power of two in
        [256, 65536]; a smaller causal N is raised to 256 inside, which is exact).
      implementation: None (automatic: "pallas_tpu" on TPU when the FFT size fits, else "xla";
        the Triton kernel is opt-in), "reference", "xla", "pallas_gpu" or "pallas_tpu".

    Returns:
      y: [B, H, L] in ``u.dtype``.

    Example:
      >>> u = jnp.ones((2, 4, 100)); k = jnp.ones((4, 100)) / 100
      >>> fft_conv(u, k, D=jnp.ones((4,))).shape
      (2, 4, 100)
    """
    op = "fft_conv"
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
    if fft_size is None:
        fft_size = _next_pow2(L + Lk - 1) if causal else L
    check_positive(op, "fft_size", fft_size)
    if causal and fft_size < L + Lk - 1:
        raise ValueError(
            f"{op}: fft_size={fft_size} < L + Lk - 1 = {L + Lk - 1} wraps the causal convolution "
            f"around; use fft_size >= {L + Lk - 1} or causal=False for a circular convolution"
        )
    if not causal and fft_size < L:
        raise ValueError(f"{op}: circular fft_size={fft_size} must be >= L={L}")
    check_choice(op, "implementation", implementation, (None, *_FFT_IMPLS))
    kw = dict(D=D, pregate=pregate, postgate=postgate, causal=bool(causal), fft_size=fft_size)
    impls = _FFT_IMPLS if implementation is not None else _FFT_AUTO_IMPLS
    _, fn = select_implementation(op, implementation, impls, u, k, **kw)
    return fn(u, k, **kw)


def causal_conv1d(
    x: Float[Array, "B T C"],
    w: Float[Array, "W C"],
    bias: Float[Array, " C"] | None = None,
    activation: str | None = None,
    *,
    implementation: str | None = None,
) -> Float[Array, "B T C"]:
    """Short depthwise causal convolution (Mamba, https://arxiv.org/abs/2312.00752; GLA's conv).

    ``y[t, c] = act(bias[c] + Σ_j w[j, c] · x[t − W + 1 + j, c])``, channels last, W ≤ 8 taps:
    the short-range sibling of `fft_conv` (the newest input is multiplied by ``w[W − 1]``).

    Args:
      x: [B, T, C]; the output has its dtype.
      w: taps [W, C], 1 ≤ W ≤ 8. bias: optional [C].
      activation: None or "silu" ("swish" is an alias).
      implementation: None (automatic), "reference", "xla", "pallas_gpu" or "pallas_tpu".

    Example:
      >>> causal_conv1d(jnp.ones((1, 5, 3)), jnp.ones((4, 3))).shape
      (1, 5, 3)
    """
    op = "causal_conv1d"
    check_array(op, "x", x, ndim=3)
    B, T, C = x.shape
    if T == 0:
        raise ValueError(f"{op}: x must have a non-empty time axis T, got {describe(x)}")
    check_array(op, "w", w, shape=(None, C))
    if not 1 <= w.shape[0] <= MAX_SHORT_TAPS:
        raise ValueError(
            f"{op}: w must have shape (W, C={C}) with 1 <= W <= {MAX_SHORT_TAPS}, "
            f"got {describe(w)}; use fft_conv for long kernels"
        )
    if bias is not None:
        check_array(op, "bias", bias, shape=(C,))
    check_choice(op, "activation", activation, _ACTIVATIONS)
    check_choice(op, "implementation", implementation, (None, *_SHORT_IMPLS))
    act = "silu" if activation == "swish" else activation
    _, fn = select_implementation(op, implementation, _SHORT_IMPLS, x, w, bias, act)
    return fn(x, w, bias, act)
