"""Public entry points: `chunk_gla` (training / prefill) and `fused_recurrent_gla` (decoding).

Both validate every argument (shapes, dtypes, ranks; errors name the argument) and dispatch with
`select_implementation`: `chunk_gla` over `IMPLEMENTATIONS` (``reference``, ``xla``,
``pallas_gpu``, ``pallas_tpu``; ``block_sizes``, a `BlockSizes`, is passed through to the Pallas
ones), `fused_recurrent_gla` over `FUSED_RECURRENT_GLA_IMPLEMENTATIONS` (``reference``, ``xla``).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.gla import pallas_gpu, pallas_tpu
from jaxblocks.kernels.gla._common import BlockSizes as BlockSizes
from jaxblocks.kernels.gla.reference import gla_reference, segment_starts
from jaxblocks.kernels.gla.xla import effective_chunk, floor_gates, gla_xla, recurrent_xla
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.validation import check_array, check_bool
from jaxblocks.typing import Array, Float, Int

INT = (jnp.int32, jnp.int64, jnp.int16, jnp.int8, jnp.uint32)
CHUNK_SIZES = (16, 32, 64, 128)


def _reference(
    q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes, precision
):
    del chunk_size, block_sizes
    return gla_reference(
        q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        precision=precision,
    )  # fmt: skip


def _xla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes, precision):
    del block_sizes
    return gla_xla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        precision=precision,
    )


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference),
    "xla": Implementation(_xla),
    "pallas_gpu": Implementation(pallas_gpu.gla_pallas_gpu, supports=pallas_gpu.supports),
    "pallas_tpu": Implementation(pallas_tpu.gla_pallas_tpu, supports=pallas_tpu.supports),
}


def _check_scale(op, scale) -> float | None:
    """None, or a finite real number (Python or a concrete 0-d array) as a float."""
    if scale is None:
        return None
    is_real = isinstance(scale, numbers.Real) or (
        hasattr(scale, "dtype")
        and np.ndim(scale) == 0
        and (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer))
    )
    if isinstance(scale, (bool, np.bool_)) or not is_real:
        raise TypeError(
            f"{op}: scale must be None or a real number, got {type(scale).__name__} {scale!r}"
        )
    if isinstance(scale, jax.core.Tracer):
        raise TypeError(
            f"{op}: scale must be a concrete number (it is static to the kernels), got a traced "
            f"value {scale}; close over it or mark it static under jit"
        )
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite, got {value!r}")
    return value


def _check_implementation(op, implementation):
    if implementation is not None and not isinstance(implementation, str):
        raise TypeError(
            f"{op}: implementation must be None or a str, "
            f"got {type(implementation).__name__} {implementation!r}"
        )


def _short(values) -> str:
    values = np.asarray(values).tolist()
    return (
        str(values) if len(values) <= 12 else f"{values[:6]} ... {values[-6:]} (N+1={len(values)})"
    )


def _check_cu_seqlens_values(op, cu_seqlens, T):
    """0 first, non-decreasing, last = T; on concrete values only (see `chunk_gla`)."""
    if isinstance(cu_seqlens, jax.core.Tracer):
        return
    cu = np.asarray(cu_seqlens).astype(np.int64)
    if cu[0] != 0:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0, got cu_seqlens[0]={cu[0]} in {_short(cu)}"
        )
    bad = np.flatnonzero(np.diff(cu) < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={cu[i]} > "
            f"cu_seqlens[{i + 1}]={cu[i + 1]} in {_short(cu)}"
        )
    if cu[-1] != T:
        raise ValueError(
            f"{op}: cu_seqlens must end at T={T} (the length of q), got cu_seqlens[-1]={cu[-1]} "
            f"in {_short(cu)}"
        )


def _cu_seqlens_valid(cu_seqlens, T):
    """The same conditions on traced values, as a scalar bool (the outputs are NaN when False)."""
    cu = cu_seqlens.astype(jnp.int32)
    return (cu[0] == 0) & jnp.all(cu[1:] >= cu[:-1]) & (cu[-1] == T)


def _check_qkvg(op, q, k, v, g):
    check_array(op, "q", q, ndim=4, min_size=None)
    B, T, H, K = q.shape
    check_array(op, "k", k, shape=(B, T, H, K))
    check_array(op, "g", g, shape=(B, T, H, K))
    check_array(op, "v", v, ndim=4)
    check_array(op, "v", v, shape=(B, T, H, None))
    if K == 0 or v.shape[-1] == 0 or H == 0 or B == 0:
        raise ValueError(
            f"{op}: B, H, K and V must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    return B, T, H, K, v.shape[-1]


def _segment_final_states(q, k, v, g, seg, cu_seqlens, h0, scale, N, precision, C=64):
    """Per-sequence initial-state contribution to ``o`` and per-sequence final states.

    For packed sequences (``cu_seqlens``) with ``N`` sequences: token t of sequence n sees
    ``scale · (q_t ⊙ exp(Γ_t)) h0_n`` with Γ the gate cumsum restarted at each sequence, and the
    final state of sequence n is ``exp(Γ_end) ⊙ h0_n + Σ_{t ∈ n} kd_tᵀ v_t`` with
    ``kd_t = k_t ⊙ exp(Γ_end(n) − Γ_t)`` (exponent ≤ 0: the later gates of the same sequence).

    The sum runs in chunks of ``C`` tokens, never dense in (T, N): a `lax.scan` over the chunks
    carries the running sum ``R`` of the sequence alive at the chunk's end (reset where a chunk
    starts a sequence) and hands it to that sequence when it ends in the next chunk holding its
    end; the rows of each sequence inside the chunk holding its end are one masked product per
    sequence, on that chunk gathered (``[N, C, H, K]``). The ``h0`` term of ``o`` is formed as
    ``[T, N, H, V]`` (dense in (T, N), a few sequences per packed batch).
    """
    T = q.shape[1]
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    f32 = jnp.float32
    starts = segment_starts(seg)[0]  # [T]
    g32 = floor_gates(g[0])  # [T, H, K] fp32, −inf gates finite (see xla.GATE_FLOOR)

    def combine(a, b):  # segmented sum: restart where b starts a segment
        return jnp.where(b[1][:, None, None], b[0], a[0] + b[0]), a[1] | b[1]

    Gs, _ = jax.lax.associative_scan(combine, (g32, starts))  # [T, H, K]
    cu = cu_seqlens.astype(jnp.int32)
    nonempty = cu[1:] > cu[:-1]  # [N]
    end = jnp.clip(cu[1:] - 1, 0, T - 1)  # [N] last token of each sequence
    Gend = jnp.where(nonempty[:, None, None], Gs[end], 0.0)  # [N, H, K]; 0 for empty ones
    sid = seg[0]  # [T] the sequence of every token
    k32, v32, q32 = (x[0].astype(f32) for x in (k, v, q))
    kd = k32 * jnp.exp(Gend[sid] - Gs)  # [T, H, K], exponent ≤ 0

    NT = -(-T // C)
    pad = lambda x: jnp.pad(x, ((0, NT * C - T),) + ((0, 0),) * (x.ndim - 1))
    kc = pad(kd).reshape(NT, C, H, K)
    vc = pad(v32).reshape(NT, C, H, V)
    sc = jnp.pad(sid, (0, NT * C - T), mode="edge").reshape(NT, C)  # padding: kd = 0 there
    first, last = sc[:, 0], sc[:, -1]  # [NT]
    prev_last = jnp.concatenate([jnp.full((1,), -1, sid.dtype), last[:-1]])
    cont = first == prev_last  # the chunk continues the sequence that R belongs to
    hand = cont & (end[first] < (jnp.arange(NT) + 1) * C)  # ... which ends in this chunk
    keep = cont & (first == last)  # no sequence starts in the chunk: R runs on
    to_state = (sc == last[:, None]).astype(f32)[:, :, None, None]  # [NT, C, 1, 1]

    def step(carry, xs):  # one chunk: hand R over, then R += this chunk's rows of `last`
        R, final = carry
        kc_j, vc_j, ts_j, n0, hand_j, keep_j = xs
        final = final.at[n0].add(jnp.where(hand_j, R, 0.0))
        Pc = jnp.einsum("chk,chv->hkv", kc_j * ts_j, vc_j, precision=precision)  # [H, K, V]
        return (Pc + jnp.where(keep_j, R, 0.0), final), None

    init = (jnp.zeros((H, K, V), f32), jnp.zeros((N, H, K, V), f32))
    (_, final), _ = jax.lax.scan(step, init, (kc, vc, to_state, first, hand, keep))
    # The rows of each sequence in the chunk holding its end (the rest came through R).
    jn = end // C  # [N]
    own = ((sc[jn] == jnp.arange(N)[:, None]) & nonempty[:, None]).astype(f32)  # [N, C]
    final = final + jnp.einsum(
        "nchk,nchv->nhkv", kc[jn] * own[:, :, None, None], vc[jn], precision=precision
    )
    o_extra = None
    if h0 is not None:
        final = final + jnp.exp(Gend)[..., None] * h0
        qd = q32 * jnp.exp(Gs)  # [T, H, K], exponent ≤ 0
        y = jnp.einsum("thk,nhkv->tnhv", qd, h0, precision=precision)  # [T, N, H, V]
        o_extra = scale * jnp.take_along_axis(y, sid[:, None, None, None], axis=1)[:, 0][None]
    return o_extra, final


def chunk_gla(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H K"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "B H K V"] | None = None,
    output_final_state: bool = False,
    segment_ids: Int[Array, "B T"] | None = None,
    cu_seqlens: Int[Array, " N1"] | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    precision: str = "highest",
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"] | None]:
    """Gated linear attention, chunkwise (Yang et al., https://arxiv.org/abs/2312.06635).

    Computes, per batch row and head, ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t`` and
    ``o_t = scale · q_t S_t`` with a ``K × V`` state, in chunks of ``chunk_size`` tokens (fla's
    ``chunk_gla`` API and layout). ``g`` is the per-key-channel log forget gate (normally ≤ 0,
    e.g. ``logsigmoid``; positive values are allowed but may overflow, as in the recurrence).

    Non-finite inputs, in every implementation: a gate of ``−inf`` (``log 0``, a hard reset)
    zeroes that key channel of the state, exactly as the token loop does (forward and gradients
    stay finite; gates under ``xla.GATE_FLOOR = −256``, whose ``exp`` is 0 in fp32, are taken as
    that floor). A NaN (or an infinite ``q``, ``k``, ``v``, or a ``+inf`` gate, which overflows
    the state) makes the later outputs of its batch row and head NaN, and never reaches another
    row or head. In the chunked implementations (``xla``, Pallas) it also reaches the earlier
    positions of its chunk and, with ``segment_ids``/``cu_seqlens``, the other segments of its
    row (masked products are 0 · NaN); the reference keeps it in its segment. A NaN in
    ``initial_state`` reaches the outputs of its row and head.

    Args:
      q, k, g: ``[B, T, H, K]``; v: ``[B, T, H, V]``. Any float dtype; bf16 runs bf16 matmuls
        with fp32 accumulation, the output has ``v``'s dtype.
      scale: query scale, a finite real number (static); default ``K ** -0.5``.
      initial_state: fp32 ``[B, H, K, V]`` state before position 0 (with ``cu_seqlens``:
        ``[N, H, K, V]``, one per sequence).
      output_final_state: a bool: also return the final state (fp32).
      segment_ids: int ``[B, T]``; the state is reset to zero wherever the id changes, so packed
        sequences are independent. ``initial_state`` then belongs to the first segment of each
        row and the final state (``[B, H, K, V]``) is that of the last segment of each row.
      cu_seqlens: int ``[N + 1]`` cumulative sequence lengths (fla/FlashAttention convention,
        requires ``B == 1``); converted to segment ids. States are then per sequence: the final
        state has shape ``[N, H, K, V]`` (an empty sequence returns its initial state). It must
        start at 0, be non-decreasing and end at T: concrete values (numpy, or jax arrays
        outside ``jit``) are checked here and a violation raises ``ValueError`` naming the
        offending entries. A traced ``cu_seqlens`` (an argument of a jitted function) can only
        have its rank, dtype and length checked at trace time; its values are checked on device
        and, when they are invalid, ``o`` and the final state are all NaN instead of silently
        wrong.
      chunk_size: one of 16, 32, 64, 128 (sub-chunks are 16 wide).
      implementation: ``None`` (automatic), ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or
        ``"pallas_tpu"``.
      block_sizes: tile sizes of the Pallas kernels (`BlockSizes`: the sub-chunk, the value
        block and Triton's warps; the chunk is ``chunk_size``); None gives the defaults.
        ``reference`` and ``xla`` ignore it.
      precision: ``"highest"`` (default) or ``"tf32"``, the precision of every matrix product
        with fp32 operands in every implementation, forward and backward (README "Precision":
        ``"highest"`` is IEEE fp32 on GPU and multi-pass bf16 on TPU, ``"tf32"`` TF32 tensor
        cores / one bf16 pass); bf16 operands are multiplied exactly under either.

    Returns:
      ``(o [B, T, H, V], final_state or None)``.

    Example:
      >>> q = k = g = -jnp.ones((1, 8, 2, 16)); v = jnp.ones((1, 8, 2, 16))
      >>> o, _ = chunk_gla(q, k, v, g)
    """
    op = "chunk_gla"
    prec = resolve_precision(op, precision)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{op}: block_sizes must be None or a jaxblocks.kernels.gla.BlockSizes, "
            f"got {type(block_sizes).__name__} {block_sizes!r}"
        )
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    B, T, H, K, V = _check_qkvg(op, q, k, v, g)
    scale = _check_scale(op, scale)
    check_bool(op, "output_final_state", output_final_state)
    _check_implementation(op, implementation)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(
            f"{op}: chunk_size must be an int in {list(CHUNK_SIZES)}, "
            f"got {type(chunk_size).__name__} {chunk_size!r}"
        )
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"{op}: chunk_size must be one of {list(CHUNK_SIZES)}, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError(f"{op}: pass segment_ids or cu_seqlens, not both")
    N = None
    if cu_seqlens is not None:
        check_array(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=INT)
        if B != 1:
            raise ValueError(f"{op}: cu_seqlens requires batch size B == 1, got q {tuple(q.shape)}")
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"{op}: cu_seqlens must have at least 2 entries, got {cu_seqlens}")
        _check_cu_seqlens_values(op, cu_seqlens, T)
        N = cu_seqlens.shape[0] - 1
        # Token t belongs to sequence n when cu[n] <= t < cu[n+1] (empty sequences own no token).
        pos = jnp.arange(T)
        segment_ids = (jnp.searchsorted(cu_seqlens, pos, side="right") - 1)[None].astype(jnp.int32)
    if segment_ids is not None:
        check_array(op, "segment_ids", segment_ids, shape=(B, T), dtypes=INT)
    state_rows = N if N is not None else B
    if initial_state is not None:
        check_array(op, "initial_state", initial_state, dtypes=(jnp.float32,))
        check_array(op, "initial_state", initial_state, shape=(state_rows, H, K, V))
    scale = float(K**-0.5) if scale is None else scale

    if T == 0:
        o = jnp.zeros((B, 0, H, V), v.dtype)
        if not output_final_state:
            return o, None
        final = initial_state if initial_state is not None else None
        return o, final if final is not None else jnp.zeros((state_rows, H, K, V), jnp.float32)

    _, fn = select_implementation(
        op,
        implementation,
        IMPLEMENTATIONS,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state if N is None else None,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        block_sizes=block_sizes,
        precision=prec,
    )
    if N is None:
        o, final = fn(
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=initial_state,
            segment_ids=segment_ids,
            chunk_size=chunk_size,
            block_sizes=block_sizes,
            precision=prec,
        )
        return o, final if output_final_state else None
    o, _ = fn(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=None,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        block_sizes=block_sizes,
        precision=prec,
    )
    o_extra, final = _segment_final_states(
        q, k, v, g, segment_ids, cu_seqlens, initial_state, scale, N, prec,
        C=effective_chunk(T, chunk_size),
    )  # fmt: skip
    if o_extra is not None:
        o = (o.astype(jnp.float32) + o_extra).astype(o.dtype)
    if isinstance(cu_seqlens, jax.core.Tracer):  # values unchecked above: NaN, not silently wrong
        ok = _cu_seqlens_valid(cu_seqlens, T)
        o = jnp.where(ok, o, jnp.nan).astype(o.dtype)
        final = jnp.where(ok, final, jnp.nan)
    return o, final if output_final_state else None


def _recurrent_reference(q, k, v, g, *, scale, initial_state, precision):
    return gla_reference(q, k, v, g, scale=scale, initial_state=initial_state, precision=precision)


def _recurrent_xla(q, k, v, g, *, scale, initial_state, precision):
    return recurrent_xla(q, k, v, g, initial_state, scale, precision=precision)


FUSED_RECURRENT_GLA_IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_recurrent_reference),
    "xla": Implementation(_recurrent_xla),
}


def fused_recurrent_gla(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H K"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "B H K V"] | None = None,
    output_final_state: bool = False,
    implementation: str | None = None,
    precision: str = "highest",
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"] | None]:
    """Gated linear attention as a token loop, for decoding a few tokens against a state.

    Same recurrence and arguments as `chunk_gla` (https://arxiv.org/abs/2312.06635); O(1) work
    per token in T, so ``chunk_gla`` over a prompt followed by ``fused_recurrent_gla`` token by
    token (carrying ``final_state``) equals ``chunk_gla`` over the whole sequence. Its one
    matrix product is the read-out ``q_t S_t``, at ``precision`` (``"highest"`` or ``"tf32"``,
    as in `chunk_gla`); the state update is elementwise.

    Example:
      >>> q = k = g = -jnp.ones((1, 1, 2, 16)); v = jnp.ones((1, 1, 2, 16))
      >>> o, S = fused_recurrent_gla(q, k, v, g, output_final_state=True)
    """
    op = "fused_recurrent_gla"
    prec = resolve_precision(op, precision)
    B, T, H, K, V = _check_qkvg(op, q, k, v, g)
    scale = _check_scale(op, scale)
    check_bool(op, "output_final_state", output_final_state)
    _check_implementation(op, implementation)
    if initial_state is not None:
        check_array(op, "initial_state", initial_state, dtypes=(jnp.float32,))
        check_array(op, "initial_state", initial_state, shape=(B, H, K, V))
    scale = float(K**-0.5) if scale is None else scale
    h0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
    if T == 0:
        return jnp.zeros((B, 0, H, V), v.dtype), (h0 if output_final_state else None)
    _, fn = select_implementation(
        op,
        implementation,
        FUSED_RECURRENT_GLA_IMPLEMENTATIONS,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=h0,
        precision=prec,
    )
    o, final = fn(q, k, v, g, scale=scale, initial_state=h0, precision=prec)
    return o, final if output_final_state else None
