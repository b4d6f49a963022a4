"""Ring self-attention over a sequence mesh axis (Li et al., arXiv:2105.13120; blockwise form of
Liu et al., arXiv:2310.01889).

Each device on the sequence axis holds one contiguous chunk of the queries, keys and values. The
key/value chunks travel around the ring with `lax.ppermute`; at every hop a device attends its
queries to the chunk it currently holds and folds the result into a running (max, denominator,
numerator) triple — the online softmax — so the full ``T × T`` score matrix is never formed and
per-device memory is O(T/N). After N hops every query has seen every key; the result equals dense
softmax attention. Gradients come from plain autodiff through `lax.scan` (the transpose of
`ppermute` is the reverse ring).

Differs from the seed paper's RingQK/RingAV (which materialises the ``T/N × T`` scores and does two
ring passes) in using a single pass with the online softmax.

The mesh axis names are arguments (defaults: the trainer's ``sequence``, ``("data", "fsdp")`` and
``tensor``), so the layer works on any mesh and imports nothing from the trainer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxblocks.typing import Array, Float

__all__ = [
    "DEFAULT_BATCH_AXES",
    "DEFAULT_HEAD_AXIS",
    "DEFAULT_SEQUENCE_AXIS",
    "dense_attention",
    "ring_attention",
]

# The mesh axis names of `jaxblocks.train.sharding` (a test checks they agree).
DEFAULT_SEQUENCE_AXIS = "sequence"
DEFAULT_BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
DEFAULT_HEAD_AXIS = "tensor"

_NEG = -1e30  # finite "minus infinity": fully masked blocks must not produce inf - inf = nan


def dense_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    causal: bool = False,
) -> Float[Array, "B T H V"]:
    """Reference softmax attention, fp32 statistics: ``softmax(q kᵀ / √K [+ causal mask]) v``."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        t = q.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(mask, s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqs,bshv->bqhv", p.astype(v.dtype), v).astype(q.dtype)


def _varying_axes(x) -> frozenset:
    # The varying-mesh-axes set of a value inside shard_map (`.vma` in jax <= 0.10, `.mat.varying`
    # in 0.11).
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    return frozenset(aval.mat.varying)


def _ring_body(q, k, v, *, axis: str, causal: bool):
    # q: [B, t, H, K] local chunk; k, v: [B, t, H, *] chunk currently held.
    n = jax.lax.axis_size(axis)
    idx = jax.lax.axis_index(axis)
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5
    perm = [(i, (i + 1) % n) for i in range(n)]
    qf = q.astype(jnp.float32) * scale
    q_pos = idx * t + jnp.arange(t)

    def step(carry, s):
        m, l, o, k_blk, v_blk = carry
        # The block held at hop s started on device idx - s.
        src = (idx - s) % n
        sc = jnp.einsum("bqhk,bshk->bhqs", qf, k_blk.astype(jnp.float32))  # [B, H, t, t]
        if causal:
            k_pos = src * t + jnp.arange(t)
            sc = jnp.where(q_pos[:, None] >= k_pos[None, :], sc, _NEG)
        m_new = jnp.maximum(m, sc.max(-1))  # [B, H, t]
        corr = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[..., None])
        if causal:  # rows with no visible key in this block contribute nothing
            p = jnp.where(q_pos[:, None] >= k_pos[None, :], p, 0.0)
        l_new = l * corr + p.sum(-1)
        o_new = o * corr[..., None] + jnp.einsum("bhqs,bshv->bhqv", p, v_blk.astype(jnp.float32))
        # Pass the chunk on; the last hop's permute is wasted but keeps the scan body uniform.
        k_nxt = jax.lax.ppermute(k_blk, axis, perm)
        v_nxt = jax.lax.ppermute(v_blk, axis, perm)
        return (m_new, l_new, o_new, k_nxt, v_nxt), None

    # Fresh carries are "unvarying"; the scan body makes them vary like q, k, v (VMA typing).
    vma = tuple(sorted(_varying_axes(q) | _varying_axes(k) | _varying_axes(v)))
    b, _, h, _ = q.shape
    m0 = jnp.full((b, h, t), _NEG, jnp.float32)
    l0 = jnp.zeros((b, h, t), jnp.float32)
    o0 = jnp.zeros((b, h, t, v.shape[-1]), jnp.float32)
    if vma:
        m0, l0, o0 = (jax.lax.pcast(x, vma, to="varying") for x in (m0, l0, o0))
    (m, l, o, _, _), _ = jax.lax.scan(step, (m0, l0, o0, k, v), jnp.arange(n))
    out = o / jnp.maximum(l, 1e-30)[..., None]  # [B, H, t, V]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _check_axis_names(
    sequence_axis: object, batch_axes: object, head_axis: object
) -> tuple[str, tuple[str, ...], str | None]:
    if not isinstance(sequence_axis, str):
        raise TypeError(
            f"ring_attention: sequence_axis must be a mesh axis name (str), got "
            f"{type(sequence_axis).__name__} {sequence_axis!r}"
        )
    if batch_axes is None:
        batch_axes = ()
    elif isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    if not isinstance(batch_axes, Sequence) or not all(isinstance(a, str) for a in batch_axes):
        raise TypeError(
            f"ring_attention: batch_axes must be a sequence of mesh axis names (str), got "
            f"{type(batch_axes).__name__} {batch_axes!r}"
        )
    batch_axes = tuple(batch_axes)
    if head_axis is not None and not isinstance(head_axis, str):
        raise TypeError(
            f"ring_attention: head_axis must be a mesh axis name (str) or None, got "
            f"{type(head_axis).__name__} {head_axis!r}"
        )
    used = [sequence_axis, *batch_axes] + ([head_axis] if head_axis is not None else [])
    if len(set(used)) != len(used):
        raise ValueError(
            f"ring_attention: sequence_axis={sequence_axis!r}, batch_axes={batch_axes!r} and "
            f"head_axis={head_axis!r} must name distinct mesh axes"
        )
    return sequence_axis, batch_axes, head_axis


def ring_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    causal: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    *,
    sequence_axis: str = DEFAULT_SEQUENCE_AXIS,
    batch_axes: Sequence[str] | None = DEFAULT_BATCH_AXES,
    head_axis: str | None = DEFAULT_HEAD_AXIS,
) -> Float[Array, "B T H V"]:
    """Ring self-attention with `jax.shard_map` + `lax.ppermute` over the mesh axis `sequence_axis`.

    Args:
      q, k, v: global arrays ``[B, T, H, K|V]``; ``T`` must divide by the size of `sequence_axis`.
      causal: autoregressive mask.
      mesh: the mesh (default: the one set with `jax.set_mesh`). Without a mesh, or when
        `sequence_axis` is not in it or has size 1, this is `dense_attention`.
      sequence_axis: the mesh axis the time dimension is split over (the ring).
      batch_axes: mesh axes the batch dimension is split over; those missing from the mesh are
        skipped, and the batch is replicated when ``B`` does not divide by their product.
        ``None`` or ``()``: replicated.
      head_axis: mesh axis the heads are split over when ``H`` divides by its size (``None``:
        replicated).

    Returns:
      ``[B, T, H, V]``, equal (up to fp32 rounding) to `dense_attention`.

    Example::

      mesh = jax.make_mesh((2, 4), ("dp", "seq"), axis_types=(AxisType.Auto,) * 2)
      with jax.set_mesh(mesh):
          out = jax.jit(
              functools.partial(ring_attention, sequence_axis="seq", batch_axes=("dp",))
          )(q, k, v)
    """
    sequence_axis, batch_axes, head_axis = _check_axis_names(sequence_axis, batch_axes, head_axis)
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"ring_attention: q, k must be [B, T, H, K] of equal shape and v [B, T, H, V]; got "
            f"q{q.shape}, k{k.shape}, v{v.shape}"
        )
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    axis = sequence_axis
    if mesh is None or mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return dense_attention(q, k, v, causal)
    n = mesh.shape[axis]
    b, t, h, _ = q.shape
    if t % n:
        raise ValueError(f"ring_attention: sequence length {t} is not divisible by {axis}={n}")
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    dp = 1
    for a in batch_axes:
        dp *= mesh.shape[a]
    bspec = batch_axes if batch_axes and b % dp == 0 else None
    hspec = (
        head_axis
        if head_axis is not None and head_axis in mesh.axis_names and h % mesh.shape[head_axis] == 0
        else None
    )
    spec = P(bspec, axis, hspec, None)
    fn = jax.shard_map(
        functools.partial(_ring_body, axis=axis, causal=causal),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
    )
    return fn(q, k, v)
