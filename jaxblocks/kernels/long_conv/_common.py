"""What the two Pallas backends of `fft_conv` share: launch parameters, the FFT size rule, the
kernels' operands and block specs, input preparation, the custom VJP and the cost model.

Both backends run the same two Monarch-DFT kernel bodies (`monarch.make_conv_kernel`,
`monarch.xcorr_kernel`) over one full row ``[N1, N2]`` per (batch, channel) grid step, so the
operands, block specs and cost of each launch are built here (`conv_launch`, `xcorr_launch`);
a backend adds only its compiler parameters, interpret switch and kernel name in its two
``pallas_call`` wrappers. `make_fft_conv` builds the `jax.custom_vjp` from those wrappers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxblocks.kernels.long_conv import monarch
from jaxblocks.kernels.long_conv.monarch import MAX_FFT_SIZE as MAX_FFT_SIZE
from jaxblocks.kernels.long_conv.monarch import MIN_FFT_SIZE as MIN_FFT_SIZE
from jaxblocks.kernels.long_conv.monarch import split as split

CONV_MATMULS = 12  # one convolution row: 2 + 4 (forward DFT) + 4 + 2 (inverse)
XCORR_MATMULS = 18  # one correlation row: two forward DFTs and one inverse
# N = 64K holds ~20 [256, 256] fp32 tiles (inputs double-buffered, factors, spectra): ~6 MiB.
VMEM_LIMIT_BYTES = 48 * 2**20


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
        N = 4096, 8 above.
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
    """Triton warps for FFT size ``n``: ``blocks.num_warps``, or 4 up to 4096 and 8 above."""
    if blocks.num_warps is not None:
        return blocks.num_warps
    return 4 if n <= 4096 else 8


def supports(
    u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size, block_sizes=None
) -> str | None:
    """None when the Monarch kernels take this FFT size (both backends: the same rule)."""
    del u, k, D, pregate, postgate, block_sizes  # every BlockSizes is valid on both backends
    n = kernel_fft_size(fft_size, causal)
    if not monarch.is_supported_size(n):
        return f"fft_size={n} must be a power of two in [{MIN_FFT_SIZE}, {MAX_FFT_SIZE}]"
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


def conv_launch(u4, pre4, post4, d3, kr, ki, n: int, out_dtype) -> Launch:
    """The fused convolution kernel over rows [B, H, N1, N2], grid (B, H)."""
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
    kernel = monarch.make_conv_kernel(pre4 is not None, post4 is not None, d3 is not None)
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


def xcorr_launch(a4, b4, n: int) -> Launch:
    """The cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N), grid (B, H)."""
    B, H, n1, n2 = a4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    return Launch(
        monarch.xcorr_kernel,
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

    ``conv_call(u4, pre4, post4, d3, kr, ki, n, out_dtype, blocks)`` runs `conv_launch`;
    ``xcorr_call(a4, b4, n, blocks)`` runs `xcorr_launch` (``blocks``: a `BlockSizes`). The
    backward reuses them: the gradient of a convolution is a correlation,

        dv[s] = Σ_t dy[t] k[t − s]  = conv(dy, k reversed)  -> conv_call with conj(K)
        dk[j] = Σ_b Σ_t dy[t] v[t − j]                     -> xcorr_call(dy, v), summed over b

    both exact for the circular convolution of period N and so for the causal one (N ≥ L+Lk−1:
    the wrapped-around terms meet zero padding).

    Returns:
      ``fft_conv(u, k, D=None, pregate=None, postgate=None, *, causal, fft_size,
      block_sizes=None)``, the signature of the op's implementations.
    """

    def forward(u, k, D, pre, post, n, out_dtype, blocks):
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
        y = conv_call(rows(u, n), pre4, post4, d3, kr, ki, n, out_dtype, blocks)
        return unrows(y, L)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def fn(u, k, D, pre, post, n, blocks):
        return forward(u, k, D, pre, post, n, u.dtype, blocks)

    def fn_fwd(u, k, D, pre, post, n, blocks):
        if post is None:
            y = forward(u, k, D, pre, None, n, u.dtype, blocks)
            return y, (u, k, D, pre, post, None)
        y = forward(u, k, D, pre, None, n, jnp.float32, blocks)  # kept for d(postgate) = dz ⊙ y
        z = (y * post.astype(jnp.float32)).astype(u.dtype)
        return z, (u, k, D, pre, post, y)

    def fn_bwd(n, blocks, res, dz):
        u, k, D, pre, post, y = res
        L, Lk = u.shape[-1], k.shape[-1]
        dz = dz.astype(jnp.float32)
        u32 = u.astype(jnp.float32)
        dy = dz if post is None else dz * post.astype(jnp.float32)
        d_post = None if post is None else (dz * y).astype(post.dtype)
        # dv = correlation of dy with k: the forward kernel with the conjugate filter spectrum.
        kr, ki = monarch.filter_spectrum(k, n, conj=True)
        dv = unrows(conv_call(rows(dy, n), None, None, None, kr, ki, n, jnp.float32, blocks), L)
        v = u32 if pre is None else u32 * pre.astype(jnp.float32)
        # dk = Σ_b correlation of dy with v: one kernel row per (b, h), summed over b here.
        corr = unrows(xcorr_call(rows(dy, n), rows(v, n), n, blocks), Lk)  # [B, H, Lk], ·N
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
        u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size, block_sizes=None
    ):
        blocks = BlockSizes() if block_sizes is None else block_sizes
        return fn(u, k, D, pregate, postgate, kernel_fft_size(fft_size, causal), blocks)

    return fft_conv
