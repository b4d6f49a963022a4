"""`selective_scan` as Pallas TPU kernels (Mosaic), after axlearn's / recurrentgemma's scans.

Grid ``(batch·G, dim / block_d, L / chunk)`` with ``dimension_semantics = (parallel, parallel,
arbitrary)``: the chunk axis is innermost and sequential, and the ``[N, block_d]`` state (state
on sublanes, channels on the 128 lanes) lives in a VMEM scratch across it. Blocks are
``(chunk, block_d)`` for the token-major ``[batch·G, L, dim]`` inputs (``chunk % 8 == 0``,
``block_d % 128 == 0``) and ``(chunk, N)`` for ``B, C [batch·G, L, N]`` (N is the full dim), so
every block obeys the (8, 128) rule; the wrapper pads dim to whole tiles and L to whole chunks with
zeros (a zero Δ carries the state through unchanged) and casts the inputs to fp32.

The forward also writes the state entering every chunk. The backward grid visits the chunks in
reverse (index maps ``nc - 1 - s``), recomputes the chunk's states into a ``[chunk + 1, N,
block_d]`` VMEM scratch from the saved entering state, and steps back with the state cotangent
``g`` in VMEM scratch; ``dA`` accumulates in its revisited output block, ``dB, dC`` are per-tile
partial sums (summed outside).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.selective_scan._common import finish, prepare
from jaxblocks.kernels.selective_scan.pallas_gpu import cost_estimate

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Channels per tile ``block_d`` (multiple of 128) and tokens per grid step ``chunk`` (of 8)."""

    block_d: int = 128
    chunk: int = 64

    def __post_init__(self):
        if self.block_d <= 0 or self.block_d % LANES:
            raise ValueError(f"BlockSizes.block_d must be a multiple of 128, got {self.block_d}")
        if self.chunk <= 0 or self.chunk % SUBLANES:
            raise ValueError(f"BlockSizes.chunk must be a multiple of 8, got {self.chunk}")


def _step(t, u_ref, dt_ref, b_ref, A):
    """Token ``t`` of the block: decay ``a [N, bd]``, input ``x [N, bd]`` and its rows."""
    dt = dt_ref[pl.ds(t, 1), :]  # (1, bd)
    u = u_ref[pl.ds(t, 1), :]  # (1, bd)
    b = b_ref[t][:, None]  # (N,) -> (N, 1)
    a = jnp.exp(dt * A)  # exp(Δ_t A): (N, bd)
    return a, (dt * u) * b, dt, u, b


def _fwd_kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, y_ref, last_ref, hs_ref, h_scr):
    # u_ref, dt_ref, y_ref: (T, bd); a_ref: (N, bd); b_ref, c_ref: (T, N)
    # last_ref: (N, bd) revisited over chunks; hs_ref: (N, bd) state entering this chunk
    # h_scr: VMEM (N, bd) fp32, the carry across the sequential chunk axis
    s = pl.program_id(2)

    @pl.when(s == 0)
    def _():
        h_scr[...] = jnp.zeros_like(h_scr)

    A = a_ref[...]
    hs_ref[...] = h_scr[...]

    def body(t, h):  # Mamba's recurrence over the chunk's tokens
        a, x, _, _, _ = _step(t, u_ref, dt_ref, b_ref, A)
        h = a * h + x  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
        cc = c_ref[t][:, None]  # (N, 1)
        y_ref[pl.ds(t, 1), :] = jnp.sum(h * cc, axis=0, keepdims=True)  # y_t = C_t h_t
        return h

    h = jax.lax.fori_loop(0, y_ref.shape[0], body, h_scr[...])
    h_scr[...] = h

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        last_ref[...] = h


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
    g_scr,
    st_scr,
):
    # Blocks of chunk nc-1-s. inputs as in the forward, + hs_ref (N, bd) the entering state,
    # dy_ref (T, bd), dlast_ref (N, bd). du_ref, ddt_ref: (T, bd); da_ref: (N, bd) accumulated
    # over chunks; db_ref, dc_ref: (T, N) sums over this tile's channels.
    # g_scr: VMEM (N, bd) the state cotangent across chunks; st_scr: VMEM (T + 1, N, bd) states.
    s = pl.program_id(2)
    T = u_ref.shape[0]

    @pl.when(s == 0)
    def _():
        g_scr[...] = dlast_ref[...]
        da_ref[...] = jnp.zeros_like(da_ref)

    A = a_ref[...]
    st_scr[0] = hs_ref[...]

    def recompute(t, h):  # the chunk's states h_t -> st_scr[t + 1]
        a, x, _, _, _ = _step(t, u_ref, dt_ref, b_ref, A)
        h = a * h + x
        st_scr[t + 1] = h
        return h

    jax.lax.fori_loop(0, T, recompute, hs_ref[...])

    def back(i, carry):  # tokens in reverse
        g, dA = carry  # g = dL/dh_t (total): (N, bd)
        t = T - 1 - i
        a, _, dt, u, b = _step(t, u_ref, dt_ref, b_ref, A)
        dy = dy_ref[pl.ds(t, 1), :]  # (1, bd)
        cc = c_ref[t][:, None]  # (N, 1)
        g = g + dy * cc  # + ∂y_t/∂h_t
        dc_ref[t] = jnp.sum(dy * st_scr[t + 1], axis=1)  # Σ_d dy h_t: (N,)
        dla = g * st_scr[t] * a  # dL/d(Δ_t A) = g ⊙ h_{t-1} ⊙ a_t
        dA = dA + dla * dt
        gb = jnp.sum(g * b, axis=0, keepdims=True)  # Σ_n g B_t: (1, bd)
        ddt_ref[pl.ds(t, 1), :] = jnp.sum(dla * A, axis=0, keepdims=True) + gb * u
        du_ref[pl.ds(t, 1), :] = gb * dt
        db_ref[t] = jnp.sum(g * (dt * u), axis=1)  # (N,)
        return g * a, dA

    g, dA = jax.lax.fori_loop(0, T, back, (g_scr[...], jnp.zeros_like(A)))
    g_scr[...] = g
    da_ref[...] += dA


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _forward_call(u, dt, A, B, C, blocks):
    bG, Lp, Hp = u.shape
    G, N, _ = A.shape
    bd, T = blocks.block_d, blocks.chunk
    nc = Lp // T
    tok = pl.BlockSpec((None, T, bd), lambda i, j, s: (i, s, j))
    bc = pl.BlockSpec((None, T, N), lambda i, j, s: (i, s, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        _fwd_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, N, Hp), f32),
            jax.ShapeDtypeStruct((bG, nc, N, Hp), f32),
        ),
        grid=(bG, Hp // bd, nc),
        in_specs=[tok, tok, pl.BlockSpec((None, N, bd), lambda i, j, s: (i % G, 0, j)), bc, bc],
        out_specs=(
            tok,
            pl.BlockSpec((None, N, bd), lambda i, j, s: (i, 0, j)),
            pl.BlockSpec((None, None, N, bd), lambda i, j, s: (i, s, 0, j)),
        ),
        scratch_shapes=[pltpu.VMEM((N, bd), f32)],
        compiler_params=_params(),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, 4),
        interpret=tpu_interpret(),
        name="selective_scan_fwd_tpu",
    )(u, dt, A, B, C)


def _backward_call(u, dt, A, B, C, hs, dy, dlast, blocks):
    bG, Lp, Hp = u.shape
    G, N, _ = A.shape
    bd, T = blocks.block_d, blocks.chunk
    nc, nd = Lp // T, Hp // bd
    r = lambda s: nc - 1 - s  # chunks in reverse
    tok = pl.BlockSpec((None, T, bd), lambda i, j, s: (i, r(s), j))
    bc = pl.BlockSpec((None, T, N), lambda i, j, s: (i, r(s), 0))
    state = pl.BlockSpec((None, N, bd), lambda i, j, s: (i, 0, j))
    part = pl.BlockSpec((None, None, T, N), lambda i, j, s: (j, i, r(s), 0))
    f32 = jnp.float32
    return pl.pallas_call(
        _bwd_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, N, Hp), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
        ),
        grid=(bG, nd, nc),
        in_specs=[
            tok,
            tok,
            pl.BlockSpec((None, N, bd), lambda i, j, s: (i % G, 0, j)),
            bc,
            bc,
            pl.BlockSpec((None, None, N, bd), lambda i, j, s: (i, r(s), 0, j)),
            tok,
            state,
        ],
        out_specs=(tok, tok, state, part, part),
        scratch_shapes=[pltpu.VMEM((N, bd), f32), pltpu.VMEM((T + 1, N, bd), f32)],
        compiler_params=_params(),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, 4, backward=True),
        interpret=tpu_interpret(),
        name="selective_scan_bwd_tpu",
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
    dA = jnp.sum(dA.reshape(-1, G, *dA.shape[1:]), axis=0)  # batch rows -> [G, N, Hp]
    return du, ddt, dA, jnp.sum(dB, axis=0), jnp.sum(dC, axis=0)


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_core(u, dt, A, B, C, blocks: BlockSizes | None = None):
    """The flattened scan (see `_common.prepare`) with the Mosaic kernels; pads, runs, slices."""
    blocks = BlockSizes() if blocks is None else blocks
    f32 = jnp.float32
    bG, H, L = u.shape
    bd = blocks.block_d
    T = min(blocks.chunk, -(-L // SUBLANES) * SUBLANES)  # short sequences: one small chunk
    blocks = dataclasses.replace(blocks, chunk=T)
    Hp, Lp = -(-H // bd) * bd, -(-L // T) * T
    ph, pt = Hp - H, Lp - L
    tok = lambda x, p: jnp.swapaxes(jnp.pad(x.astype(f32), ((0, 0), (0, p), (0, pt))), 1, 2)
    y, last = _scan(
        tok(u, ph),
        tok(dt, ph),
        jnp.swapaxes(jnp.pad(A.astype(f32), ((0, 0), (0, ph), (0, 0))), 1, 2),  # [G, N, Hp]
        tok(B, 0),
        tok(C, 0),
        blocks,
    )
    return jnp.swapaxes(y[:, :L, :H], 1, 2), jnp.swapaxes(last, 1, 2)[:, :H]


def selective_scan_pallas_tpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, blocks=None
):
    """`selective_scan` with the Mosaic kernels; returns ``(out, last_state)``."""
    uf, dt, Af, Bf, Cf = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last = scan_core(uf, dt, Af, Bf, Cf, blocks)
    return finish(y, last, u, D, z)
