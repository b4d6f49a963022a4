"""What the two Pallas backends of `fft_conv` share: launch parameters, the FFT size rule, the
kernels' operands and block specs, input preparation, the custom VJP and the cost model.

Both backends run the same two Monarch-DFT kernel bodies (`monarch.make_conv_kernel`,
`monarch.xcorr_kernel`) over one full row ``[N1, N2]`` per (batch, channel) grid step, so the
operands, block specs and cost of each launch are built here (`conv_launch`, `xcorr_launch`);
a backend adds only its compiler parameters, interpret switch and kernel name in its two
``pallas_call`` wrappers. `make_fft_conv` builds the `jax.custom_vjp` from those wrappers.
`working_set` estimates what one program / grid step of each launch holds, and `supports`
refuses the launches that cannot fit (`jaxblocks.kernels.resources`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources
from jaxblocks.kernels.long_conv import monarch
from jaxblocks.kernels.long_conv.monarch import MAX_FFT_SIZE as MAX_FFT_SIZE
from jaxblocks.kernels.long_conv.monarch import MIN_FFT_SIZE as MIN_FFT_SIZE
from jaxblocks.kernels.long_conv.monarch import split as split

CONV_MATMULS = 12  # one convolution row: 2 + 4 (forward DFT) + 4 + 2 (inverse)
XCORR_MATMULS = 18  # one correlation row: two forward DFTs and one inverse
# N = 64K holds ~8 MiB by `working_set` (blocks double-buffered, six factors, the kernel's fp32
# temporaries); the limit leaves room above the 16/32 MiB default scoped limits.
VMEM_LIMIT_BYTES = 48 * 2**20
# Row-sized fp32 values a program holds at its peak besides the six DFT factors, counted on
# `monarch.make_conv_kernel`: at the filter product u (kept for D ⊙ u), Sr, Si, Kr, Ki and the two
# products; during a DFT u, Cr, Ci, a finished spectrum half and two matmul results. The xcorr
# kernel holds a's spectrum (2 rows) while b's DFT runs (5 rows): 7 as well.
LIVE_ROWS = 7
# The pallas_call names, (convolution, correlation) per backend.
KERNEL_NAMES: dict[str, tuple[str, str]] = {
    "pallas_gpu": ("fft_conv_monarch_gpu", "fft_xcorr_monarch_gpu"),
    "pallas_tpu": ("fft_conv_monarch_tpu", "fft_xcorr_monarch_tpu"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def default_fft_size(L: int, Lk: int, causal: bool) -> int:
    """The api's N: the next power of two >= L + Lk − 1 (causal), else the period L."""
    return next_pow2(L + Lk - 1) if causal else L


def kernel_fft_size(fft_size: int, causal: bool) -> int:
    """The N the kernels run: a smaller causal N is raised to `MIN_FFT_SIZE` (exact: more
    zero padding); a circular N is the period and stays."""
    return max(fft_size, MIN_FFT_SIZE) if causal else fft_size


# --------------------------------------------------------------------------------------------
# Block sizes (launch parameters: a block is always one full row [N1, N2])
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch parameters of the Pallas kernels; each backend reads its own fields.

    Every grid step holds one full (batch, channel) row as an ``[N1, N2]`` tile (the Monarch
    split of the FFT size N, `monarch.split`), so there is no tile size to choose: what can be
    tuned is how the row is run. One object carries both backends' parameters, so a model can
    pass the same ``block_sizes`` on any platform.

    Attributes:
      num_warps: Triton warps per program (``pallas_gpu``), a power of two; None: 4 up to
        N = 1024, 8 above (`working_set`: N = 2048 needs ~256 registers per thread at 4 warps).
      num_stages: Triton pipeline stages (``pallas_gpu``), positive; default 1.
      vmem_limit_bytes: Mosaic scoped-VMEM limit (``pallas_tpu``), positive; default 48 MiB
        (N = 64K needs about 6 MiB of tiles, above the 16/32 MiB default scoped limits).

    Example:
      >>> BlockSizes(num_warps=8).num_stages
      1
    """

    num_warps: int | None = None
    num_stages: int = 1
    vmem_limit_bytes: int = VMEM_LIMIT_BYTES

    def __post_init__(self):
        w = self.num_warps
        if w is not None and (not _is_int(w) or w <= 0 or w & (w - 1)):
            raise ValueError(
                f"BlockSizes.num_warps must be a power of two (1, 2, 4, ...) or None (4 up to "
                f"N = 4096, 8 above), got {w!r}"
            )
        for name in ("num_stages", "vmem_limit_bytes"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive integer, got {v!r}")


def num_warps(n: int, blocks: BlockSizes) -> int:
    """Triton warps for FFT size ``n``: ``blocks.num_warps``, or 4 up to 1024 and 8 above."""
    if blocks.num_warps is not None:
        return blocks.num_warps
    return 4 if n <= 1024 else 8


# --------------------------------------------------------------------------------------------
# Resource budgets (jaxblocks.kernels.resources): what one program / grid step holds
# --------------------------------------------------------------------------------------------


def factor_elements(n: int) -> int:
    """Elements of the six DFT factors F1r, F1i [N1, N1], F2r, F2i [N2, N2], Tr, Ti [N1, N2]."""
    n1, n2 = split(n)
    return 2 * n1 * n1 + 2 * n2 * n2 + 2 * n1 * n2


def working_set(
    backend: str, fft_size: int, block_sizes: BlockSizes | None = None, dtype=jnp.float32
) -> tuple[resources.GpuWorkingSet | resources.TpuWorkingSet, ...]:
    """Per-program estimates of the op's three launches at kernel FFT size ``fft_size``.

    One entry per ``pallas_call``: the forward convolution (gated, D, rows of ``dtype``), the
    backward dv convolution (fp32 rows, conjugate filter) and the backward dk correlation. Every
    program holds one whole row [N1, N2] (no tiling), so the estimate grows with N, not B or H:

    * ``pallas_gpu``: registers for the six fp32 DFT factors and `LIVE_ROWS` fp32 rows, spread
      over ``32·num_warps`` threads; shared memory for the operands of the largest matmul,
      F1 [N1, N1] @ A [N1, N2] (no loop, so nothing is pipelined over stages).
    * ``pallas_tpu``: the blocks of one grid step (row inputs and output, filter spectrum, D,
      the factors), double-buffered, plus the kernel's `LIVE_ROWS` fp32 temporaries as scratch
      (values this large live in VMEM, not in vregs).
    """
    blocks = BlockSizes() if block_sizes is None else block_sizes
    n1, n2 = split(fft_size)
    conv, xcorr = KERNEL_NAMES[backend]
    names = (f"{conv} (forward)", f"{conv} (backward dv)", f"{xcorr} (backward dk)")
    row32, fac = resources.nbytes((fft_size,), jnp.float32), 4 * factor_elements(fft_size)
    if backend == "pallas_gpu":
        live = fac + LIVE_ROWS * row32
        smem = resources.nbytes((n1 * n1 + n1 * n2,), jnp.float32)
        warps = num_warps(fft_size, blocks)
        return tuple(resources.GpuWorkingSet(name, live, warps, smem) for name in names)
    row = resources.nbytes((fft_size,), dtype)
    # u, pregate, postgate in; D [1, N2]; Kr, Ki; the output in fp32 (the forward of the VJP).
    forward = 3 * row + 4 * n2 + 2 * row32 + fac + row32
    dv = row32 + 2 * row32 + fac + row32  # dy in, Kr, Ki, factors, dv out
    dk = 2 * row32 + fac + row32  # dy and v in, factors, the correlation out
    scratch = LIVE_ROWS * row32
    return tuple(
        resources.TpuWorkingSet(name, b, scratch)
        for name, b in zip(names, (forward, dv, dk), strict=True)
    )


def working_set_reason(ws, block_sizes: BlockSizes | None = None) -> str | None:
    """None when ``ws`` fits its target (`resources.H100` / `resources.TPU_V5E`), else why.

    On a GPU `GpuWorkingSet.check` (registers per thread, the SM's register file, shared
    memory); on a TPU a grid step's VMEM must also fit the ``BlockSizes.vmem_limit_bytes`` it
    runs with.
    """
    blocks = BlockSizes() if block_sizes is None else block_sizes
    if isinstance(ws, resources.GpuWorkingSet):
        return ws.check(resources.H100)
    limits = resources.TPU_V5E
    if blocks.vmem_limit_bytes < limits.vmem_bytes:
        limits = resources.TpuLimits("BlockSizes.vmem_limit_bytes", blocks.vmem_limit_bytes)
    return ws.check(limits)


def supports(
    backend: str,
    u,
    k,
    D=None,
    pregate=None,
    postgate=None,
    *,
    causal=True,
    fft_size,
    block_sizes=None,
    precision=None,
) -> str | None:
    """None when ``backend``'s Monarch kernels take this FFT size and launch, else why not.

    Both backends need a power-of-two N in [`MIN_FFT_SIZE`, `MAX_FFT_SIZE`]; then every launch's
    `working_set` must fit (on a GPU this stops at N = 4096: a program holds one whole row).
    """
    del k, D, pregate, postgate, precision  # the estimate counts the gated forward
    n = kernel_fft_size(fft_size, causal)
    if not monarch.is_supported_size(n):
        return f"fft_size={n} must be a power of two in [{MIN_FFT_SIZE}, {MAX_FFT_SIZE}]"
    for ws in working_set(backend, n, block_sizes, u.dtype):
        reason = working_set_reason(ws, block_sizes)
        if reason is not None:
            return (
                f"{reason} (at fft_size={n}, each program holds one whole row and the six DFT "
                f"factors; implementation='xla' takes any size)"
            )
    return None


# --------------------------------------------------------------------------------------------
# Cost model (the kernels' pl.CostEstimate; specs.py and the benchmark use the same formulas)
# --------------------------------------------------------------------------------------------


def flops(rows: int, n: int, matmuls: int = CONV_MATMULS) -> int:
    """FLOPs of ``rows`` kernel rows of ``matmuls`` DFT matmuls at FFT size ``n``."""
    n1, n2 = split(n)
    # Left matmuls are [N1,N1]@[N1,N2], right ones [N1,N2]@[N2,N2]: half of each on average.
    flops_mm = matmuls * (n1 * n2 * (n1 + n2))  # 2·M·N·K averaged over the two kinds
    return rows * (flops_mm + 16 * n)


def bytes_accessed(n: int, io_bytes: int) -> int:
    """``io_bytes`` of row inputs and outputs plus the fp32 DFT factors (read once)."""
    n1, n2 = split(n)
    return io_bytes + 4 * (2 * n1 * n1 + 2 * n2 * n2 + 2 * n)


def cost_estimate(rows: int, n: int, matmuls: int, io_bytes: int) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=flops(rows, n, matmuls),
        transcendentals=0,
        bytes_accessed=bytes_accessed(n, io_bytes),
    )


# --------------------------------------------------------------------------------------------
# The two launches: operands, block specs, grid, cost (a backend adds its compiler params)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch without its backend parts: ``pl.pallas_call(kernel, **specs, ...)``
    applied to ``args``."""

    kernel: Callable[..., None]
    args: tuple[jax.Array, ...]
    specs: dict[str, Any]


def factor_specs(n: int) -> list[pl.BlockSpec]:
    """Full blocks of the six DFT factors (F1r, F1i, F2r, F2i, Tr, Ti), revisited every step."""
    n1, n2 = split(n)
    full = lambda s: pl.BlockSpec(s, lambda b, h: (0, 0))
    return [full((n1, n1)), full((n1, n1)), full((n2, n2)), full((n2, n2))] + [full((n1, n2))] * 2


def conv_launch(u4, pre4, post4, d3, kr, ki, n: int, out_dtype, precision) -> Launch:
    """The fused convolution kernel over rows [B, H, N1, N2], grid (B, H); ``precision`` (a
    `jax.lax.Precision`) is its DFT matmuls'."""
    B, H, n1, n2 = u4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    per_h = pl.BlockSpec((None, n1, n2), lambda b, h: (h, 0, 0))
    args, specs = [u4], [row]
    for g in (pre4, post4):
        if g is not None:
            args.append(g)
            specs.append(row)
    if d3 is not None:
        args.append(d3)
        specs.append(pl.BlockSpec((None, 1, n2), lambda b, h: (h, 0, 0)))
    args += [kr, ki, *monarch.factors(n)]
    specs += [per_h, per_h, *factor_specs(n)]
    io = sum(a.size * a.dtype.itemsize for a in args[: len(args) - 6])
    io += B * H * n * jnp.dtype(out_dtype).itemsize
    kernel = monarch.make_conv_kernel(
        pre4 is not None, post4 is not None, d3 is not None, precision
    )
    return Launch(
        kernel,
        tuple(args),
        dict(
            out_shape=jax.ShapeDtypeStruct(u4.shape, out_dtype),
            grid=(B, H),
            in_specs=specs,
            out_specs=row,
            cost_estimate=cost_estimate(B * H, n, CONV_MATMULS, io),
        ),
    )


def xcorr_launch(a4, b4, n: int, precision) -> Launch:
    """The cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N), grid (B, H);
    ``precision`` is its DFT matmuls'."""
    B, H, n1, n2 = a4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    return Launch(
        functools.partial(monarch.xcorr_kernel, precision=precision),
        (a4, b4, *monarch.factors(n)),
        dict(
            out_shape=jax.ShapeDtypeStruct(a4.shape, jnp.float32),
            grid=(B, H),
            in_specs=[row, row, *factor_specs(n)],
            out_specs=row,
            cost_estimate=cost_estimate(B * H, n, XCORR_MATMULS, 3 * B * H * n * 4),
        ),
    )


# --------------------------------------------------------------------------------------------
# Input preparation and fft_conv on top of the two launchers, with its custom_vjp
# --------------------------------------------------------------------------------------------


def rows(x, n: int):
    """[B, H, L] -> zero-padded [B, H, N1, N2] rows."""
    n1, n2 = split(n)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[-1])))
    return x.reshape(*x.shape[:2], n1, n2)  # [B, H, N] -> [B, H, N1, N2]


def unrows(y, length: int):
    return y.reshape(*y.shape[:2], -1)[..., :length]  # [B, H, N1, N2] -> [B, H, L]


def make_fft_conv(conv_call: Callable, xcorr_call: Callable) -> Callable:
    """Build a backend's ``fft_conv`` implementation, with a custom_vjp, from two launchers.

    ``conv_call(u4, pre4, post4, d3, kr, ki, n, out_dtype, blocks, precision)`` runs
    `conv_launch`; ``xcorr_call(a4, b4, n, blocks, precision)`` runs `xcorr_launch` (``blocks``: a
    `BlockSizes`; ``precision``: a `jax.lax.Precision` for every DFT matmul). The backward
    reuses them: the gradient of a convolution is a correlation,

        dv[s] = Σ_t dy[t] k[t − s]  = conv(dy, k reversed)  -> conv_call with conj(K)
        dk[j] = Σ_b Σ_t dy[t] v[t − j]                     -> xcorr_call(dy, v), summed over b

    both exact for the circular convolution of period N and so for the causal one (N ≥ L+Lk−1:
    the wrapped-around terms meet zero padding).

    Returns:
      ``fft_conv(u, k, D=None, pregate=None, postgate=None, *, causal, fft_size,
      block_sizes=None, precision=HIGHEST)``, the signature of the op's implementations.
    """

    def forward(u, k, D, pre, post, n, out_dtype, blocks, prec):
        L = u.shape[-1]
        kr, ki = monarch.filter_spectrum(k, n)
        d3 = (
            None
            if D is None
            else jnp.broadcast_to(
                D.astype(jnp.float32)[:, None, None], (D.shape[0], 1, split(n)[1])
            )
        )
        pre4 = None if pre is None else rows(pre, n)
        post4 = None if post is None else rows(post, n)
        y = conv_call(rows(u, n), pre4, post4, d3, kr, ki, n, out_dtype, blocks, prec)
        return unrows(y, L)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
    def fn(u, k, D, pre, post, n, blocks, prec):
        return forward(u, k, D, pre, post, n, u.dtype, blocks, prec)

    def fn_fwd(u, k, D, pre, post, n, blocks, prec):
        if post is None:
            y = forward(u, k, D, pre, None, n, u.dtype, blocks, prec)
            return y, (u, k, D, pre, post, None)
        # y is kept for d(postgate) = dz ⊙ y
        y = forward(u, k, D, pre, None, n, jnp.float32, blocks, prec)
        z = (y * post.astype(jnp.float32)).astype(u.dtype)
        return z, (u, k, D, pre, post, y)

    def fn_bwd(n, blocks, prec, res, dz):
        u, k, D, pre, post, y = res
        L, Lk = u.shape[-1], k.shape[-1]
        dz = dz.astype(jnp.float32)
        u32 = u.astype(jnp.float32)
        dy = dz if post is None else dz * post.astype(jnp.float32)
        d_post = None if post is None else (dz * y).astype(post.dtype)
        # dv = correlation of dy with k: the forward kernel with the conjugate filter spectrum.
        kr, ki = monarch.filter_spectrum(k, n, conj=True)
        dy4 = rows(dy, n)
        dv = unrows(conv_call(dy4, None, None, None, kr, ki, n, jnp.float32, blocks, prec), L)
        v = u32 if pre is None else u32 * pre.astype(jnp.float32)
        # dk = Σ_b correlation of dy with v: one kernel row per (b, h), summed over b here.
        corr = unrows(xcorr_call(dy4, rows(v, n), n, blocks, prec), Lk)  # [B, H, Lk], ·N
        dk = (jnp.sum(corr, axis=0) / n).astype(k.dtype)
        du = dv if pre is None else dv * pre.astype(jnp.float32)
        dD = None
        if D is not None:
            du = du + dy * D.astype(jnp.float32)[None, :, None]
            dD = jnp.sum(dy * u32, axis=(0, 2)).astype(D.dtype)
        d_pre = None if pre is None else (dv * u32).astype(pre.dtype)
        return du.astype(u.dtype), dk, dD, d_pre, d_post

    fn.defvjp(fn_fwd, fn_bwd)

    def fft_conv(
        u,
        k,
        D=None,
        pregate=None,
        postgate=None,
        *,
        causal=True,
        fft_size,
        block_sizes=None,
        precision=monarch.DEFAULT_PRECISION,
    ):
        blocks = BlockSizes() if block_sizes is None else block_sizes
        n = kernel_fft_size(fft_size, causal)
        return fn(u, k, D, pregate, postgate, n, blocks, precision)

    return fft_conv
