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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.selective_scan import _common
from jaxblocks.kernels.selective_scan._common import LANES, SUBLANES, BlockSizes, cost_estimate

# The kernels set no `vmem_limit_bytes`, so they must fit the default scoped VMEM limit, as we
# understand it 16 MiB on v4/v5e (newer chips default higher). Not verified: no TPU was available.
VMEM_BUDGET = 16 * 2**20


def _chunk(blocks: BlockSizes, L: int) -> int:
    """Tokens per grid step: ``tpu_chunk``, or the sequence rounded up to 8 when shorter."""
    return min(blocks.tpu_chunk, _common.round_up(L, SUBLANES))


def vmem_bytes(N: int, chunk: int, block_d: int) -> int:
    """VMEM of the backward kernel (the larger one), fp32, blocks padded to (8, 128) tiles.

    Double-buffered blocks: ``(chunk, block_d)`` for u, Δ, dy, du, dΔ; ``(chunk, N)`` for B, C,
    dB, dC; ``(N, block_d)`` for A, hs, dlast, dA; plus the ``g`` and ``chunk + 1`` states
    scratch. Derived from the block specs, not measured on a TPU.
    """
    tok = _common.round_up(chunk, SUBLANES) * block_d
    bc = _common.round_up(chunk, SUBLANES) * _common.round_up(N, LANES)
    state = _common.round_up(N, SUBLANES) * block_d
    blocks = 5 * tok + 4 * bc + 4 * state
    return 4 * (2 * blocks + state + (chunk + 1) * state)


def supports(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    *,
    block_sizes: BlockSizes | None = None,
):
    """None, or why the Mosaic kernels cannot take these inputs (VMEM: the states of a chunk)."""
    del delta, B, C, D, z, delta_bias, delta_softplus
    blocks = _common.default_block_sizes() if block_sizes is None else block_sizes
    N, T, bd = A.shape[1], _chunk(blocks, u.shape[2]), blocks.tpu_block_d
    need = vmem_bytes(N, T, bd)
    if need > VMEM_BUDGET:
        return (
            f"the backward kernel needs {need / 2**20:.1f} MiB of VMEM at N={N}, "
            f"tpu_chunk={T}, tpu_block_d={bd}, over the {VMEM_BUDGET // 2**20} MiB budget; "
            "use a smaller tpu_chunk or tpu_block_d"
        )
    return None


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
    bd, T = blocks.tpu_block_d, blocks.tpu_chunk
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
    bd, T = blocks.tpu_block_d, blocks.tpu_chunk
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


_scan = _common.make_scan(_forward_call, _backward_call)


def scan_core(u, dt, A, B, C, blocks: BlockSizes):
    """The flattened scan (see `_common.prepare`) with the Mosaic kernels; pads, runs, slices."""
    f32 = jnp.float32
    bG, H, L = u.shape
    bd = blocks.tpu_block_d
    T = _chunk(blocks, L)  # short sequences: one small chunk
    blocks = dataclasses.replace(blocks, tpu_chunk=T)
    Hp, Lp = _common.round_up(H, bd), _common.round_up(L, T)
    ph, pt = Hp - H, Lp - L
    y, last = _scan(
        _common.token_major(u.astype(f32), ph, pt),  # [bG, Lp, Hp]
        _common.token_major(dt.astype(f32), ph, pt),
        jnp.swapaxes(jnp.pad(A.astype(f32), ((0, 0), (0, ph), (0, 0))), 1, 2),  # [G, N, Hp]
        _common.token_major(B.astype(f32), 0, pt),  # [bG, Lp, N]
        _common.token_major(C.astype(f32), 0, pt),
        blocks,
    )
    return jnp.swapaxes(y[:, :L, :H], 1, 2), jnp.swapaxes(last, 1, 2)[:, :H]


def selective_scan_pallas_tpu(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    *,
    block_sizes: BlockSizes | None = None,
):
    """`selective_scan` with the Mosaic kernels; returns ``(out, last_state)``.

    ``block_sizes`` (default `_common.default_block_sizes`) is read for ``tpu_block_d`` and
    ``tpu_chunk``.
    """
    return _common.selective_scan_with(
        scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_sizes
    )
