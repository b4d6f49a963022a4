"""`selective_scan` as Pallas GPU kernels (Triton backend), after Mamba's fused CUDA scan.

Grid ``(batch·G, dim / block_d)``: one program per batch row and tile of ``block_d`` channels.
Each program keeps its ``[block_d, N]`` state in registers (fp32) and walks the whole sequence
inside the kernel, ``chunk`` tokens per loop iteration (the chunk's steps are unrolled). The
forward writes ``y`` and the state entering every chunk (``[nc, block_d, N]``, the only saved
activation besides the inputs). The backward runs the chunks in reverse: it recomputes the chunk's
states from its entering state into registers (unrolled, so they stay register values), then
steps back through them with the state cotangent ``g``, emitting ``du, dΔ`` per token, ``dB, dC``
per token summed over the tile's channels (tiles are summed outside), and ``dA`` summed over the
sequence (batch rows are summed outside).

Layout inside: ``[batch·G, L, dim]`` (a token's channels contiguous, so every per-step load is a
coalesced row) and ``B, C: [batch·G, L, N]``. The wrapper transposes, pads channels to whole tiles,
N to a power of two (Triton tensors) and L to whole chunks, all with zeros: a zero Δ gives
``exp(0·A) = 1`` and no input, so padded tokens and channels carry the state through unchanged.
``delta_bias``/softplus, ``D`` and the ``z`` gate are fused elementwise XLA around the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.interpret import gpu_interpret
from jaxblocks.kernels.selective_scan._common import finish, prepare


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Channels per program ``block_d`` (power of two), tokens per unrolled ``chunk``, launch."""

    block_d: int = 32
    chunk: int = 8
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.block_d <= 0 or self.block_d & (self.block_d - 1):
            raise ValueError(f"BlockSizes.block_d must be a power of two, got {self.block_d}")
        if not 1 <= self.chunk <= 64:
            raise ValueError(f"BlockSizes.chunk must be in [1, 64], got {self.chunk}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(f"BlockSizes: num_warps/num_stages must be positive, got {self}")


def _load_step(t, u_ref, dt_ref, b_ref, A):
    """Token ``t``'s decay ``a [bd, N]``, input ``x [bd, N]`` and the loaded rows."""
    f32 = jnp.float32
    dt = dt_ref[t, :].astype(f32)  # (bd,)
    u = u_ref[t, :].astype(f32)  # (bd,)
    b = b_ref[t, :].astype(f32)  # (N,)
    a = jnp.exp(dt[:, None] * A)  # exp(Δ_t A): (bd, N), ≤ 1 for A ≤ 0
    x = (dt * u)[:, None] * b[None, :]  # Δ_t u_t B_t: (bd, N)
    return a, x, dt, u, b


def _fwd_kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, y_ref, last_ref, hs_ref, *, nc, T):
    # u_ref, dt_ref, y_ref: (Lp, bd); a_ref: (bd, N); b_ref, c_ref: (Lp, N)
    # last_ref: (bd, N); hs_ref: (nc, bd, N) the state entering each chunk
    A = a_ref[...].astype(jnp.float32)

    def chunk(c, h):  # Mamba's recurrence, T tokens per iteration
        hs_ref[c] = h
        for i in range(T):  # unrolled: static register values
            t = c * T + i
            a, x, _, _, _ = _load_step(t, u_ref, dt_ref, b_ref, A)
            h = a * h + x  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
            cc = c_ref[t, :].astype(jnp.float32)  # (N,)
            y_ref[t, :] = jnp.sum(h * cc[None, :], axis=1)  # y_t = C_t h_t: (bd,)
        return h

    bd, N = a_ref.shape
    last_ref[...] = jax.lax.fori_loop(0, nc, chunk, jnp.zeros((bd, N), jnp.float32))


def _bwd_kernel(
    u_ref,
    dt_ref,
    a_ref,
    b_ref,
    c_ref,
    hs_ref,
    dy_ref,
    dlast_ref,
    du_ref,
    ddt_ref,
    da_ref,
    db_ref,
    dc_ref,
    *,
    nc,
    T,
):
    # inputs as in the forward, + hs_ref (nc, bd, N), dy_ref (Lp, bd), dlast_ref (bd, N)
    # du_ref, ddt_ref: (Lp, bd); da_ref: (bd, N) this row's sum; db_ref, dc_ref: (Lp, N) this
    # tile's channel sums
    f32 = jnp.float32
    A = a_ref[...].astype(f32)

    def chunk(j, carry):  # chunks in reverse
        g, dA = carry  # g = dL/dh_t (total), dA accumulated: (bd, N) each
        c = nc - 1 - j
        h = hs_ref[c]
        states, steps = [h], []
        for i in range(T):  # recompute the chunk's states (registers)
            a, x, dt, u, b = _load_step(c * T + i, u_ref, dt_ref, b_ref, A)
            h = a * h + x
            states.append(h)
            steps.append((a, dt, u, b))
        for i in reversed(range(T)):
            t = c * T + i
            a, dt, u, b = steps[i]
            dy = dy_ref[t, :].astype(f32)  # (bd,)
            cc = c_ref[t, :].astype(f32)  # (N,)
            g = g + dy[:, None] * cc[None, :]  # + ∂y_t/∂h_t
            dc_ref[t, :] = jnp.sum(dy[:, None] * states[i + 1], axis=0)  # Σ_d dy h_t: (N,)
            dla = g * states[i] * a  # dL/d(Δ_t A) = g ⊙ h_{t-1} ⊙ a_t
            dA = dA + dla * dt[:, None]
            gb = jnp.sum(g * b[None, :], axis=1)  # Σ_n g B_t: (bd,)
            ddt_ref[t, :] = jnp.sum(dla * A, axis=1) + gb * u
            du_ref[t, :] = gb * dt
            db_ref[t, :] = jnp.sum(g * (dt * u)[:, None], axis=0)  # (N,)
            g = g * a  # to h_{t-1}
        return g, dA

    init = (dlast_ref[...].astype(f32), jnp.zeros(a_ref.shape, f32))
    _, dA = jax.lax.fori_loop(0, nc, chunk, init)
    da_ref[...] = dA


def cost_estimate(rows, H, N, L, itemsize, backward=False) -> pl.CostEstimate:
    """FLOPs/transcendentals/bytes of the scan (the benchmarks use the same formulas)."""
    n = rows * H * N * L
    flops = n * (7 if not backward else 22)
    trans = n * (1 if not backward else 1)
    io = rows * L * (H * (2 * itemsize + 4) + 2 * N * itemsize)
    return pl.CostEstimate(
        flops=int(flops),
        transcendentals=int(trans),
        bytes_accessed=int(io * (3 if backward else 1)),
    )


def _params(blocks):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward_call(u, dt, A, B, C, blocks):
    bG, Lp, Hp = u.shape
    G, _, N = A.shape
    bd, T = blocks.block_d, blocks.chunk
    nc = Lp // T
    row = pl.BlockSpec((None, Lp, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, Lp, N), lambda i, j: (i, 0, 0))
    state = pl.BlockSpec((None, bd, N), lambda i, j: (i, j, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, nc=nc, T=T),
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Hp, N), f32),
            jax.ShapeDtypeStruct((bG, nc, Hp, N), f32),
        ),
        grid=(bG, Hp // bd),
        in_specs=[
            row,
            row,
            pl.BlockSpec((None, bd, N), lambda i, j: (i % G, j, 0)),
            bc,
            bc,
        ],
        out_specs=(row, state, pl.BlockSpec((None, nc, bd, N), lambda i, j: (i, 0, j, 0))),
        compiler_params=_params(blocks),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, u.dtype.itemsize),
        interpret=gpu_interpret(),
        name="selective_scan_fwd_gpu",
    )(u, dt, A, B, C)


def _backward_call(u, dt, A, B, C, hs, dy, dlast, blocks):
    bG, Lp, Hp = u.shape
    G, _, N = A.shape
    bd, T = blocks.block_d, blocks.chunk
    nc, nd = Lp // T, Hp // bd
    row = pl.BlockSpec((None, Lp, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, Lp, N), lambda i, j: (i, 0, 0))
    state = pl.BlockSpec((None, bd, N), lambda i, j: (i, j, 0))
    bc_part = pl.BlockSpec((None, None, Lp, N), lambda i, j: (j, i, 0, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_bwd_kernel, nc=nc, T=T),
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Hp, N), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
        ),
        grid=(bG, nd),
        in_specs=[
            row,
            row,
            pl.BlockSpec((None, bd, N), lambda i, j: (i % G, j, 0)),
            bc,
            bc,
            pl.BlockSpec((None, nc, bd, N), lambda i, j: (i, 0, j, 0)),
            row,
            state,
        ],
        out_specs=(row, row, state, bc_part, bc_part),
        compiler_params=_params(blocks),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, u.dtype.itemsize, backward=True),
        interpret=gpu_interpret(),
        name="selective_scan_bwd_gpu",
    )(u, dt, A, B, C, hs, dy, dlast)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(u, dt, A, B, C, blocks):
    y, last, _ = _forward_call(u, dt, A, B, C, blocks)
    return y, last


def _scan_fwd(u, dt, A, B, C, blocks):
    y, last, hs = _forward_call(u, dt, A, B, C, blocks)
    return (y, last), (u, dt, A, B, C, hs)


def _scan_bwd(blocks, res, cts):
    u, dt, A, B, C, hs = res
    dy, dlast = cts
    du, ddt, dA, dB, dC = _backward_call(u, dt, A, B, C, hs, dy, dlast, blocks)
    G = A.shape[0]
    dA = jnp.sum(dA.reshape(-1, G, *dA.shape[1:]), axis=0)  # batch rows -> [G, Hp, N]
    return (
        du.astype(u.dtype),
        ddt,
        dA,
        jnp.sum(dB, axis=0).astype(B.dtype),  # channel tiles
        jnp.sum(dC, axis=0).astype(C.dtype),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_core(u, dt, A, B, C, blocks: BlockSizes | None = None):
    """The flattened scan (see `_common.prepare`) with the Triton kernels; pads, runs, slices."""
    blocks = BlockSizes() if blocks is None else blocks
    bG, H, L = u.shape
    G, _, N = A.shape
    bd, T = blocks.block_d, blocks.chunk
    Hp, Np, Lp = -(-H // bd) * bd, _next_pow2(N), -(-L // T) * T
    ph, pn, pt = Hp - H, Np - N, Lp - L
    tok = lambda x, p: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, p), (0, pt))), 1, 2)  # [bG, Lp, ·]
    y, last = _scan(
        tok(u, ph),
        tok(dt, ph),
        jnp.pad(A, ((0, 0), (0, ph), (0, pn))),
        tok(B, pn),
        tok(C, pn),
        blocks,
    )
    return jnp.swapaxes(y[:, :L, :H], 1, 2), last[:, :H, :N]


def selective_scan_pallas_gpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, blocks=None
):
    """`selective_scan` with the Triton kernels; returns ``(out, last_state)``."""
    uf, dt, Af, Bf, Cf = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last = scan_core(uf, dt, Af, Bf, Cf, blocks)
    return finish(y, last, u, D, z)
