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

from jaxblocks.kernels import resources
from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.selective_scan import _common
from jaxblocks.kernels.selective_scan._common import BlockSizes, cost_estimate


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
    precision=None,
):
    """None, or why the Mosaic kernels cannot take these inputs: a kernel's `working_set`
    (VMEM per grid step) over a TPU v5e's 16 MiB default scoped limit (the kernels set no
    ``vmem_limit_bytes``; newer chips default higher)."""
    del delta, D, z, delta_bias, delta_softplus, precision
    blocks = _common.default_block_sizes() if block_sizes is None else block_sizes
    G = 1 if B.ndim == 3 else B.shape[1]
    batch, dim, L = u.shape
    N = A.shape[1]
    for ws in _common.working_set("pallas_tpu", batch * G, dim // G, N, L, blocks):
        reason = ws.check(resources.TPU_V5E)
        if reason is not None:
            T, bd = _common.tpu_chunk(blocks, L), blocks.tpu_block_d
            return (
                f"{reason} (N={N}, tpu_chunk={T}, tpu_block_d={bd}); use a smaller tpu_chunk, "
                "tpu_block_d or checkpoint_every"
            )
    return None


def _step(t, u_ref, dt_ref, b_ref, A):
    """Token ``t`` of the block: decay ``a [N, bd]``, input ``x [N, bd]`` and its rows."""
    dt = dt_ref[pl.ds(t, 1), :]  # (1, bd)
    u = u_ref[pl.ds(t, 1), :]  # (1, bd)
    b = b_ref[t][:, None]  # (N,) -> (N, 1)
    a = jnp.exp(dt * A)  # exp(Δ_t A): (N, bd)
    return a, (dt * u) * b, dt, u, b


def _fwd_kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, y_ref, last_ref, hs_ref, h_scr, *, k):
    # u_ref, dt_ref, y_ref: (T, bd); a_ref: (N, bd); b_ref, c_ref: (T, N)
    # last_ref: (N, bd) revisited over chunks; hs_ref: (N, bd) the state entering this chunk's
    # segment of k chunks (revisited k times, written on the first)
    # h_scr: VMEM (N, bd) fp32, the carry across the sequential chunk axis
    s = pl.program_id(2)

    @pl.when(s == 0)
    def _():
        h_scr[...] = jnp.zeros_like(h_scr)

    A = a_ref[...]

    @pl.when(jax.lax.rem(s, k) == 0)
    def _():  # the backward's checkpoint
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
    useg_ref,
    dtseg_ref,
    bseg_ref,
    du_ref,
    ddt_ref,
    da_ref,
    db_ref,
    dc_ref,
    g_scr,
    st_scr,
    seg_scr,
    *,
    k,
):
    # Blocks of chunk c = nc-1-s. inputs as in the forward, + hs_ref (N, bd) the state entering
    # c's segment, dy_ref (T, bd), dlast_ref (N, bd), useg/dtseg_ref (k·T, bd) and bseg_ref
    # (k·T, N) the whole segment. du_ref, ddt_ref: (T, bd); da_ref: (N, bd) accumulated over
    # chunks; db_ref, dc_ref: (T, N) sums over this tile's channels.
    # g_scr: VMEM (N, bd) the state cotangent across chunks; st_scr: VMEM (T + 1, N, bd) states;
    # seg_scr: VMEM (k, N, bd) the states entering the segment's chunks.
    s = pl.program_id(2)
    T = u_ref.shape[0]
    # c's place in its segment (lax.rem/div: operands are >= 0, and jnp's % and // add sign
    # fix-ups that Mosaic cannot lower off a TPU)
    ci = jax.lax.rem(pl.num_programs(2) - 1 - s, k)

    @pl.when(s == 0)
    def _():
        g_scr[...] = dlast_ref[...]
        da_ref[...] = jnp.zeros_like(da_ref)

    A = a_ref[...]

    @pl.when(ci == k - 1)  # a segment's last chunk comes first in reverse: recompute its states
    def _():
        def fill(i, h):  # the state entering chunk i -> seg_scr[i], then run chunk i
            seg_scr[i] = h

            def step(t, h):
                a, x, _, _, _ = _step(i * T + t, useg_ref, dtseg_ref, bseg_ref, A)
                return a * h + x

            return jax.lax.fori_loop(0, T, step, h)

        seg_scr[k - 1] = jax.lax.fori_loop(0, k - 1, fill, hs_ref[...])

    st_scr[0] = seg_scr[ci]

    def recompute(t, h):  # the chunk's states h_t -> st_scr[t + 1]
        a, x, _, _, _ = _step(t, u_ref, dt_ref, b_ref, A)
        h = a * h + x
        st_scr[t + 1] = h
        return h

    jax.lax.fori_loop(0, T, recompute, seg_scr[ci])

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
    nc, k = Lp // T, blocks.checkpoint_every // T  # L padded to whole segments of k chunks
    tok = pl.BlockSpec((None, T, bd), lambda i, j, s: (i, s, j))
    bc = pl.BlockSpec((None, T, N), lambda i, j, s: (i, s, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, k=k),
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, N, Hp), f32),
            jax.ShapeDtypeStruct((bG, nc // k, N, Hp), f32),
        ),
        grid=(bG, Hp // bd, nc),
        in_specs=[tok, tok, pl.BlockSpec((None, N, bd), lambda i, j, s: (i % G, 0, j)), bc, bc],
        out_specs=(
            tok,
            pl.BlockSpec((None, N, bd), lambda i, j, s: (i, 0, j)),
            pl.BlockSpec((None, None, N, bd), lambda i, j, s: (i, jax.lax.div(s, k), 0, j)),
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
    nc, nd, k = Lp // T, Hp // bd, blocks.checkpoint_every // T
    r = lambda s: nc - 1 - s  # chunks in reverse
    seg = lambda s: jax.lax.div(r(s), k)  # their segments (operands >= 0)
    tok = pl.BlockSpec((None, T, bd), lambda i, j, s: (i, r(s), j))
    bc = pl.BlockSpec((None, T, N), lambda i, j, s: (i, r(s), 0))
    # The chunk's whole segment (its block index changes every k steps: fetched once per segment)
    seg_tok = pl.BlockSpec((None, k * T, bd), lambda i, j, s: (i, seg(s), j))
    seg_bc = pl.BlockSpec((None, k * T, N), lambda i, j, s: (i, seg(s), 0))
    state = pl.BlockSpec((None, N, bd), lambda i, j, s: (i, 0, j))
    part = pl.BlockSpec((None, None, T, N), lambda i, j, s: (j, i, r(s), 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_bwd_kernel, k=k),
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
            pl.BlockSpec((None, None, N, bd), lambda i, j, s: (i, seg(s), 0, j)),
            tok,
            state,
            seg_tok,
            seg_tok,
            seg_bc,
        ],
        out_specs=(tok, tok, state, part, part),
        scratch_shapes=[
            pltpu.VMEM((N, bd), f32),
            pltpu.VMEM((T + 1, N, bd), f32),
            pltpu.VMEM((k, N, bd), f32),
        ],
        compiler_params=_params(),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, 4, backward=True),
        interpret=tpu_interpret(),
        name="selective_scan_bwd_tpu",
    )(u, dt, A, B, C, hs, dy, dlast, u, dt, B)


_scan = _common.make_scan(_forward_call, _backward_call)


def scan_core(u, dt, A, B, C, blocks: BlockSizes):
    """The flattened scan (see `_common.prepare`) with the Mosaic kernels; pads, runs, slices."""
    f32 = jnp.float32
    bG, H, L = u.shape
    bd = blocks.tpu_block_d
    T = _common.tpu_chunk(blocks, L)  # short sequences: one small chunk
    k, nseg = _common.segments(blocks, T, L)
    blocks = dataclasses.replace(blocks, tpu_chunk=T, checkpoint_every=k * T)
    Hp, Lp = _common.round_up(H, bd), nseg * k * T
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


selective_scan_pallas_tpu = _common.make_entry(
    scan_core,
    """`selective_scan` with the Mosaic kernels; returns ``(out, last_state)``.

    ``block_sizes`` (default `_common.default_block_sizes`) is read for ``tpu_block_d``,
    ``tpu_chunk`` and ``checkpoint_every``. ``precision`` is accepted for a uniform API and
    unused: the kernels are elementwise (no matrix products).
    """,
)
