"""The Monarch (four-step Cooley–Tukey) DFT and the kernel bodies shared by the GPU and TPU
fft_conv kernels (the backends reach them through `_common`, which also holds the custom VJP).

No Pallas backend has an FFT, so the kernels compute it as matmuls. With N = N1·N2 (N1 ≥ N2,
both powers of two, N1 = 2^⌈log2(N)/2⌉) and a row x viewed as A[n1, n2] = x[N2·n1 + n2]:

    X[k1 + N1·k2] = Σ_{n2} W_{N2}^{n2·k2} · W_N^{n2·k1} · Σ_{n1} W_{N1}^{n1·k1} · A[n1, n2]
                  = ((F1 @ A) ⊙ T) @ F2        with F_m[i, j] = W_m^{ij}, T[k1, n2] = W_N^{k1·n2}

so the spectrum comes out as S[k1, k2] = X[k1 + N1·k2] (transposed order). A convolution never
needs natural order: the filter spectrum is laid out the same way and the inverse transform
undoes the steps in reverse with conjugated factors,

    x[N2·n1 + n2] = (1/N) · Re( conj(F1) @ ((S @ conj(F2)) ⊙ conj(T)) )[n1, n2].

Complex numbers are pairs of real arrays; F1 @ A of a real A takes 2 real matmuls, the complex
products 4, so one convolution row costs 2 + 4 (forward) + 4 + 2 (inverse) = 12 matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_FFT_SIZE = 256  # N2 >= 16: the smallest dot Triton takes
# N1 = N2 = 256: one row's factors and spectra fit in VMEM; on a GPU, the registers stop at 4096
# (`_common.working_set`, checked by `_common.supports`).
MAX_FFT_SIZE = 65536
# The DFT matmuls' default precision (the api's precision="highest"): full fp32 (IEEE FMAs on a
# GPU, multi-pass bf16 on the MXU). TF32 / one-pass bf16 DFTs lose ~3 digits (precision="tf32").
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


def split(n: int) -> tuple[int, int]:
    """(N1, N2) with N1·N2 = n, N1 = 2^ceil(log2(n)/2)."""
    log = int(n).bit_length() - 1
    n1 = 1 << ((log + 1) // 2)
    return n1, n // n1


def is_supported_size(n: int) -> bool:
    return MIN_FFT_SIZE <= n <= MAX_FFT_SIZE and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def _factors_np(n: int) -> tuple[np.ndarray, ...]:
    n1, n2 = split(n)
    f1 = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n1)) / n1)  # [N1, N1]
    f2 = np.exp(-2j * np.pi * np.outer(np.arange(n2), np.arange(n2)) / n2)  # [N2, N2]
    tw = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n2)) / n)  # [N1, N2] (k1, n2)
    return tuple(
        a.astype(np.float32) for a in (f1.real, f1.imag, f2.real, f2.imag, tw.real, tw.imag)
    )


def factors(n: int) -> tuple[jax.Array, ...]:
    """(F1r, F1i, F2r, F2i, Tr, Ti) in fp32 for FFT size n (computed in float64 on the host)."""
    return tuple(jnp.asarray(a) for a in _factors_np(n))


def filter_spectrum(k, n: int, *, conj: bool = False) -> tuple[jax.Array, jax.Array]:
    """Spectrum of k [H, Lk] zero-padded to n, in the kernels' [H, N1, N2] order, scaled by 1/n.

    The kernel's spectrum is computed once per channel (not per batch row) with XLA's FFT, as
    FlashFFTConv does; ``conj=True`` gives the spectrum of the time-reversed kernel (correlation).
    """
    n1, n2 = split(n)
    kf = jnp.fft.fft(k.astype(jnp.float32), n=n) / n  # [H, n]  X[k1 + N1·k2]
    kf = jnp.swapaxes(kf.reshape(k.shape[0], n2, n1), 1, 2)  # [H, N1, N2]  S[k1, k2]
    im = -kf.imag if conj else kf.imag
    return kf.real, im


def dft(a, f1r, f1i, f2r, f2i, tr, ti, *, precision=DEFAULT_PRECISION):
    """Real row A [N1, N2] -> spectrum (Sr, Si) [N1, N2] in transposed order (module docstring).

    ``precision`` (a `jax.lax.Precision`) goes to all six matmuls (fp32 operands, fp32 result).
    """
    _dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    # Step 1: length-N1 DFTs down the columns, B = F1 @ A; A is real so 2 matmuls.
    br = _dot(f1r, a)  # [N1, N1] @ [N1, N2] -> [N1, N2]
    bi = _dot(f1i, a)  # [N1, N1] @ [N1, N2] -> [N1, N2]
    # Step 2: twiddles, C = B ⊙ T.
    cr = br * tr - bi * ti
    ci = br * ti + bi * tr
    # Step 3: length-N2 DFTs along the rows, S = C @ F2 (complex: 4 matmuls).
    sr = _dot(cr, f2r) - _dot(ci, f2i)  # [N1, N2] @ [N2, N2] -> [N1, N2]
    si = _dot(cr, f2i) + _dot(ci, f2r)  # [N1, N2] @ [N2, N2] -> [N1, N2]
    return sr, si


def idft_real(sr, si, f1r, f1i, f2r, f2i, tr, ti, *, precision=DEFAULT_PRECISION):
    """Spectrum (Sr, Si) [N1, N2] in transposed order -> N · Re(inverse DFT) as a row [N1, N2].

    ``precision`` goes to all six matmuls, as in `dft`.
    """
    _dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    # Inverse step 3: E = S @ conj(F2).
    er = _dot(sr, f2r) + _dot(si, f2i)  # [N1, N2] @ [N2, N2] -> [N1, N2]
    ei = _dot(si, f2r) - _dot(sr, f2i)  # [N1, N2] @ [N2, N2] -> [N1, N2]
    # Inverse step 2: conjugate twiddles, G = E ⊙ conj(T).
    gr = er * tr + ei * ti
    gi = ei * tr - er * ti
    # Inverse step 1: Re(conj(F1) @ G) = F1r @ Gr + F1i @ Gi (the imaginary part is not needed).
    return _dot(f1r, gr) + _dot(f1i, gi)  # [N1, N1] @ [N1, N2] -> [N1, N2]


def make_conv_kernel(has_pre: bool, has_post: bool, has_d: bool, precision):
    """Kernel body: one row of y = post ⊙ (IDFT(DFT(pre ⊙ u) ⊙ K) + D ⊙ u), all in fp32.

    Refs, in order: u, [pre], [post], [D (1, N2)], Kr, Ki (already scaled by 1/N), F1r, F1i,
    F2r, F2i, Tr, Ti, out; every row block is [N1, N2]. ``precision``: the 12 DFT matmuls'.
    """

    def kernel(*refs):
        refs = list(refs)
        u_ref = refs.pop(0)
        pre_ref = refs.pop(0) if has_pre else None
        post_ref = refs.pop(0) if has_post else None
        d_ref = refs.pop(0) if has_d else None
        kr_ref, ki_ref, f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref, o_ref = refs
        fac = tuple(r[...] for r in (f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref))
        u = u_ref[...].astype(jnp.float32)  # [N1, N2]
        v = u * pre_ref[...].astype(jnp.float32) if has_pre else u
        sr, si = dft(v, *fac, precision=precision)
        kr, ki = kr_ref[...], ki_ref[...]  # [N1, N2]
        # FFT -> pointwise multiply -> inverse FFT, without leaving the kernel.
        y = idft_real(sr * kr - si * ki, sr * ki + si * kr, *fac, precision=precision)
        if has_d:
            y = y + d_ref[...].astype(jnp.float32) * u  # [1, N2] broadcast over N1
        if has_post:
            y = y * post_ref[...].astype(jnp.float32)
        o_ref[...] = y.astype(o_ref.dtype)

    return kernel


def xcorr_kernel(
    a_ref, b_ref, f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref, o_ref, *, precision
):
    """One row of N · IDFT(DFT(a) ⊙ conj(DFT(b))): circular cross-correlation Σ_t a[t] b[t-j].

    ``precision``: the 18 DFT matmuls' (bind it with `functools.partial`).
    """
    fac = tuple(r[...] for r in (f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref))
    ar, ai = dft(a_ref[...].astype(jnp.float32), *fac, precision=precision)
    br, bi = dft(b_ref[...].astype(jnp.float32), *fac, precision=precision)
    y = idft_real(ar * br + ai * bi, ai * br - ar * bi, *fac, precision=precision)
    o_ref[...] = y.astype(o_ref.dtype)
