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

from jaxblocks.kernels import resources
from jaxblocks.kernels.interpret import gpu_interpret
from jaxblocks.kernels.selective_scan import _common
from jaxblocks.kernels.selective_scan._common import BlockSizes, cost_estimate

TRITON_MAX_NUMEL = 2**20  # Triton's largest tensor (elements)


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
    """None, or why the Triton kernels cannot take these inputs: the state is one tensor, and
    each kernel's `working_set` must fit an H100 SM (the reason names the kernel)."""
    del delta, C, D, z, delta_bias, delta_softplus, precision
    blocks = _common.default_block_sizes() if block_sizes is None else block_sizes
    N = A.shape[1]
    numel = blocks.gpu_block_d * _common.next_pow2(N)
    if numel > TRITON_MAX_NUMEL:
        return (
            f"the [gpu_block_d, N] state tensor has {blocks.gpu_block_d}x{_common.next_pow2(N)} = "
            f"{numel} elements (N={N} padded to a power of two), over Triton's {TRITON_MAX_NUMEL}"
        )
    G = 1 if B.ndim == 3 else B.shape[1]
    batch, dim, L = u.shape
    for ws in _common.working_set("pallas_gpu", batch * G, dim // G, N, L, blocks):
        reason = ws.check(resources.H100)
        if reason is not None:
            return (
                f"{reason} (gpu_block_d={blocks.gpu_block_d}, gpu_chunk={blocks.gpu_chunk}, N={N})"
            )
    return None


def _load_step(t, u_ref, dt_ref, b_ref, A):
    """Token ``t``'s decay ``a [bd, N]``, input ``x [bd, N]`` and the loaded rows."""
    f32 = jnp.float32
    dt = dt_ref[t, :].astype(f32)  # (bd,)
    u = u_ref[t, :].astype(f32)  # (bd,)
    b = b_ref[t, :].astype(f32)  # (N,)
    a = jnp.exp(dt[:, None] * A)  # exp(Δ_t A): (bd, N), ≤ 1 for A ≤ 0
    x = (dt * u)[:, None] * b[None, :]  # Δ_t u_t B_t: (bd, N)
    return a, x, dt, u, b


def _advance(c, h, u_ref, dt_ref, b_ref, A, T):
    """The state after chunk ``c`` from the state ``h [bd, N]`` entering it (T unrolled steps)."""
    for i in range(T):
        a, x, _, _, _ = _load_step(c * T + i, u_ref, dt_ref, b_ref, A)
        h = a * h + x  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    return h


def _fwd_kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, y_ref, last_ref, hs_ref, *, nseg, k, T):
    # u_ref, dt_ref, y_ref: (Lp, bd); a_ref: (bd, N); b_ref, c_ref: (Lp, N); Lp = nseg·k·T
    # last_ref: (bd, N); hs_ref: (nseg, bd, N) the state entering each segment of k chunks
    A = a_ref[...].astype(jnp.float32)

    def chunk(c, h):  # Mamba's recurrence, T tokens per iteration
        for i in range(T):  # unrolled: static register values
            t = c * T + i
            a, x, _, _, _ = _load_step(t, u_ref, dt_ref, b_ref, A)
            h = a * h + x  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
            cc = c_ref[t, :].astype(jnp.float32)  # (N,)
            y_ref[t, :] = jnp.sum(h * cc[None, :], axis=1)  # y_t = C_t h_t: (bd,)
        return h

    def segment(sg, h):  # save the entering state (the backward's checkpoint), run k chunks
        hs_ref[sg] = h
        return jax.lax.fori_loop(sg * k, (sg + 1) * k, chunk, h)

    bd, N = a_ref.shape
    last_ref[...] = jax.lax.fori_loop(0, nseg, segment, jnp.zeros((bd, N), jnp.float32))


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
    ws_ref,
    *,
    nseg,
    k,
    T,
    barrier,
):
    # inputs as in the forward, + hs_ref (nseg, bd, N), dy_ref (Lp, bd), dlast_ref (bd, N)
    # du_ref, ddt_ref: (Lp, bd); da_ref: (bd, N) this row's sum; db_ref, dc_ref: (Lp, N) this
    # tile's channel sums; ws_ref: (k, bd, N) workspace, the states entering a segment's chunks
    f32 = jnp.float32
    A = a_ref[...].astype(f32)

    def back_chunk(c, h, carry):  # chunk c from its entering state h, tokens in reverse
        g, dA = carry  # g = dL/dh_t (total), dA accumulated: (bd, N) each
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

    def segment(j, carry):  # segments in reverse
        c0 = (nseg - 1 - j) * k  # the segment's first chunk

        def fill(i, h):  # recompute the states entering the segment's chunks -> workspace
            ws_ref[i] = h
            return _advance(c0 + i, h, u_ref, dt_ref, b_ref, A, T)

        jax.lax.fori_loop(0, k, fill, hs_ref[nseg - 1 - j])
        barrier()  # the workspace rows are read below by other threads than wrote them
        carry = jax.lax.fori_loop(
            0, k, lambda i, cr: back_chunk(c0 + k - 1 - i, ws_ref[k - 1 - i], cr), carry
        )
        barrier()  # every read of this segment's workspace before the next one overwrites it
        return carry

    init = (dlast_ref[...].astype(f32), jnp.zeros(a_ref.shape, f32))
    _, dA = jax.lax.fori_loop(0, nseg, segment, init)
    da_ref[...] = dA


def _params(blocks):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward_call(u, dt, A, B, C, blocks):
    bG, Lp, Hp = u.shape
    G, _, N = A.shape
    bd, T = blocks.gpu_block_d, blocks.gpu_chunk
    k = blocks.checkpoint_every // T  # scan_core set it to whole chunks and padded L to it
    nseg = Lp // (k * T)
    row = pl.BlockSpec((None, Lp, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, Lp, N), lambda i, j: (i, 0, 0))
    state = pl.BlockSpec((None, bd, N), lambda i, j: (i, j, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, nseg=nseg, k=k, T=T),
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Hp, N), f32),
            jax.ShapeDtypeStruct((bG, nseg, Hp, N), f32),
        ),
        grid=(bG, Hp // bd),
        in_specs=[
            row,
            row,
            pl.BlockSpec((None, bd, N), lambda i, j: (i % G, j, 0)),
            bc,
            bc,
        ],
        out_specs=(row, state, pl.BlockSpec((None, nseg, bd, N), lambda i, j: (i, 0, j, 0))),
        compiler_params=_params(blocks),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, u.dtype.itemsize),
        interpret=gpu_interpret(),
        name="selective_scan_fwd_gpu",
    )(u, dt, A, B, C)


def _backward_call(u, dt, A, B, C, hs, dy, dlast, blocks):
    bG, Lp, Hp = u.shape
    G, _, N = A.shape
    bd, T = blocks.gpu_block_d, blocks.gpu_chunk
    k, nd = blocks.checkpoint_every // T, Hp // bd
    nseg = Lp // (k * T)
    row = pl.BlockSpec((None, Lp, bd), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, Lp, N), lambda i, j: (i, 0, 0))
    state = pl.BlockSpec((None, bd, N), lambda i, j: (i, j, 0))
    bc_part = pl.BlockSpec((None, None, Lp, N), lambda i, j: (j, i, 0, 0))
    f32 = jnp.float32
    # The interpreter runs a program's threads as one: no barrier there (nor a lowering for it).
    barrier = (lambda: None) if gpu_interpret() else pltriton.debug_barrier
    *grads, _ = pl.pallas_call(
        functools.partial(_bwd_kernel, nseg=nseg, k=k, T=T, barrier=barrier),
        out_shape=(
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Lp, Hp), f32),
            jax.ShapeDtypeStruct((bG, Hp, N), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
            jax.ShapeDtypeStruct((nd, bG, Lp, N), f32),
            jax.ShapeDtypeStruct((bG, k, Hp, N), f32),  # workspace (one segment's states)
        ),
        grid=(bG, nd),
        in_specs=[
            row,
            row,
            pl.BlockSpec((None, bd, N), lambda i, j: (i % G, j, 0)),
            bc,
            bc,
            pl.BlockSpec((None, nseg, bd, N), lambda i, j: (i, 0, j, 0)),
            row,
            state,
        ],
        out_specs=(
            row,
            row,
            state,
            bc_part,
            bc_part,
            pl.BlockSpec((None, k, bd, N), lambda i, j: (i, 0, j, 0)),
        ),
        compiler_params=_params(blocks),
        cost_estimate=cost_estimate(bG, Hp, N, Lp, u.dtype.itemsize, backward=True),
        interpret=gpu_interpret(),
        name="selective_scan_bwd_gpu",
    )(u, dt, A, B, C, hs, dy, dlast)
    return tuple(grads)


_scan = _common.make_scan(_forward_call, _backward_call)


def scan_core(u, dt, A, B, C, blocks: BlockSizes):
    """The flattened scan (see `_common.prepare`) with the Triton kernels; pads, runs, slices."""
    bG, H, L = u.shape
    G, _, N = A.shape
    bd, T = blocks.gpu_block_d, blocks.gpu_chunk
    k, nseg = _common.segments(blocks, T, L)
    blocks = dataclasses.replace(blocks, checkpoint_every=k * T)
    Hp, Np, Lp = _common.round_up(H, bd), _common.next_pow2(N), nseg * k * T
    ph, pn, pt = Hp - H, Np - N, Lp - L
    y, last = _scan(
        _common.token_major(u, ph, pt),  # [bG, Lp, Hp]
        _common.token_major(dt, ph, pt),
        jnp.pad(A, ((0, 0), (0, ph), (0, pn))),  # [G, Hp, Np]
        _common.token_major(B, pn, pt),  # [bG, Lp, Np]
        _common.token_major(C, pn, pt),
        blocks,
    )
    return jnp.swapaxes(y[:, :L, :H], 1, 2), last[:, :H, :N]


selective_scan_pallas_gpu = _common.make_entry(
    scan_core,
    """`selective_scan` with the Triton kernels; returns ``(out, last_state)``.

    ``block_sizes`` (default `_common.default_block_sizes`) is read for ``gpu_block_d``,
    ``gpu_chunk``, ``checkpoint_every``, ``num_warps`` and ``num_stages``. ``precision`` is
    accepted for a uniform API and unused: the kernels are elementwise (no matrix products).
    """,
)
