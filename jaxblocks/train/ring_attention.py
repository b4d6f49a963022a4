"""Ring self-attention over the ``sequence`` mesh axis (Li et al., arXiv:2105.13120; blockwise
form of Liu et al., arXiv:2310.01889).

Each device on the ``sequence`` axis holds one contiguous chunk of the queries, keys and values.
The key/value chunks travel around the ring with `lax.ppermute`; at every hop a device attends its
queries to the chunk it currently holds and folds the result into a running (max, denominator,
numerator) triple — the online softmax — so the full ``T × T`` score matrix is never formed and
per-device memory is O(T/N). After N hops every query has seen every key; the result equals dense
softmax attention. Gradients come from plain autodiff through `lax.scan` (the transpose of
`ppermute` is the reverse ring).

Differs from the seed paper's RingQK/RingAV (which materialises the ``T/N × T`` scores and does two
ring passes) in using a single pass with the online softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from jaxblocks.train.sharding import BATCH_AXES

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


def ring_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    causal: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = "sequence",
) -> Float[Array, "B T H V"]:
    """Ring self-attention with `jax.shard_map` + `lax.ppermute` over the mesh axis `axis`.

    Args:
      q, k, v: global arrays ``[B, T, H, K|V]``; ``T`` must divide by the size of `axis`.
      causal: autoregressive mask.
      mesh: the mesh (default: the one set with `jax.set_mesh`). Without a mesh, or when `axis`
        has size 1, this is `dense_attention`.
      axis: the sequence mesh axis.

    Returns:
      ``[B, T, H, V]``, equal (up to fp32 rounding) to `dense_attention`.

    Example::

      mesh = jaxblocks.train.sharding.make_mesh({"data": 2, "sequence": 4})
      with jax.set_mesh(mesh):
          out = jax.jit(ring_attention)(q, k, v)
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"ring_attention: q, k must be [B, T, H, K] of equal shape and v [B, T, H, V]; got "
            f"q{q.shape}, k{k.shape}, v{v.shape}"
        )
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return dense_attention(q, k, v, causal)
    n = mesh.shape[axis]
    b, t, h, _ = q.shape
    if t % n:
        raise ValueError(f"ring_attention: sequence length {t} is not divisible by {axis}={n}")
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    dp = 1
    for a in batch_axes:
        dp *= mesh.shape[a]
    bspec = batch_axes if batch_axes and b % dp == 0 else None
    hspec = "tensor" if "tensor" in mesh.axis_names and h % mesh.shape["tensor"] == 0 else None
    spec = P(bspec, axis, hspec, None)
    fn = jax.shard_map(
        functools.partial(_ring_body, axis=axis, causal=causal),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
    )
    return fn(q, k, v)
