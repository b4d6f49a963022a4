"""TGN-style memory for temporal interaction graphs, with PRES (https://arxiv.org/abs/2402.04284).

Temporal Graph Networks (Rossi et al., https://arxiv.org/abs/2006.10637; twitter-research/tgn)
keep a memory ``s_i`` per node. A *temporal batch* of ``b`` consecutive events ``(i, j, t, e)``
is processed as in TGN's ``memory_update_at_start`` mode (`tgn_step`):

1. the raw messages the previous batch left (aggregator "last": one per node) pass the message
   function (identity or TGN's 2-layer MLP) and a GRU cell updates the memory of their nodes;
2. each event's endpoints (and a negative destination) are embedded by one temporal attention
   layer over their ``K`` most recent neighbours (`TemporalAttention`), and a MergeLayer head
   scores the (source, destination) pair;
3. the batch's own events become raw messages ``[s_i, s_j, e, φ(t − t_i)]`` (φ: TGN's
   ``cos(ωΔt + b)`` time encoding) and enter the neighbour buffers — *after* the predictions, so
   events of one batch never see each other: the staleness that grows with ``b``.

PRES (Su, Zou, Wu, ICLR 2024, "PRES: Toward Scalable Memory-Based Dynamic Graph Neural Networks";
official code jwsu825/MDGNN_BS) mitigates it with

* a prediction–correction filter: per node running sums of memory increments ``Δ`` and
  ``Δ²`` (a Gaussian of the increments); the GRU's update is blended with the prediction
  ``s_prev + μ``, ``s = γ (s_prev + μ) + (1 − γ) s_GRU`` with the official ``γ = 0.9``, and
  ``Δ = s − s_prev`` enters the statistics (the two variants of ``μ`` and of what the blend
  feeds are the filter modes below);
* a memory-coherence loss (`memory_coherence`): ``β (1 − coh(s, s_prev))`` with the official
  ``β = 0.1`` and the official coherence: both memories min–max normalised to [−1, 1], the cosine
  over nodes of each memory dimension, summed over dimensions and divided by the node count.

The state of one stream is an explicit pytree (`TGNState`) so a window of temporal batches runs
as a scan (`jaxblocks.models.tgn`); `TGN` keeps it in the ``"memory"`` collection for streaming.

Filter modes (``pres_mode``). ``"official"`` (default) follows the official ``MDGNN`` code
(`pres_official_blend`): at every batch the GRU-updated memory of *all* nodes is blended with the
prediction ``s_prev + T`` (``T`` = the accumulated increments min–max normalised over all nodes to
[−1, 1]), the blend feeds only the batch's embeddings, the stored memory (and the raw messages built
from it) stays the GRU's, and the increment ``s_blend − s_prev``, min–max normalised over all nodes,
is added to the accumulator together with the ``+ 1`` the official ``Filter.update`` adds (it
increments the sum where a count was intended; the count stays unused). ``"stored"`` (the earlier
behaviour here) blends only the nodes the batch updates with the running mean ``ΣΔ / n`` of their
own increments and stores the blend as the new memory (`pres_filter_update`). The official
``Filter.compute_prediction`` (``ΣΔ / count`` with a count never incremented: 0 / 0) is never
called there and has no counterpart; in the official mode ``pres_count`` counts batches. In both
modes the coherence compares the stored memory with the memory before the batch (official:
``inner_prod(memory.memory, prev_memory)``). The official coherence term is ``.detach()``-ed (it
changes the reported loss, not the gradients); here it is differentiable unless
``coherence_stop_gradient=True`` (official). Messages pending for nodes outside the batch are
committed at once (TGN re-applies them lazily; the same value up to the parameter change between
steps).
TGN's neighbour finder also sees earlier events of the same batch; here the neighbour buffers,
like the memory, are updated after the batch. Linear biases use Flax's zero init (torch:
uniform); the MergeLayer kernels are Xavier-normal as in the official code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.typing import Array, Float, Int

__all__ = [
    "TGN",
    "GRUMemoryUpdater",
    "MergeLayer",
    "TGNState",
    "TGNStep",
    "TemporalAttention",
    "TimeEncoding",
    "aggregate_last",
    "gru_cell",
    "init_tgn_state",
    "memory_coherence",
    "minmax_normalize",
    "official_normalize",
    "pres_filter_update",
    "pres_official_blend",
    "update_neighbors",
]

MESSAGE_FUNCTIONS = ("identity", "mlp")
PRES_MODES = ("official", "stored")


class TGNState(NamedTuple):
    """The non-parameter state of one event stream (``N`` nodes, memory ``D``, ``K`` neighbours,
    edge features ``F``, raw messages ``R = 2D + F + D``)."""

    memory: Array  # [N, D] s_i
    last_update: Array  # [N] time of the last memory update
    msg: Array  # [N, R] pending raw message (aggregator "last")
    msg_time: Array  # [N]
    has_msg: Array  # [N] bool
    nbr_id: Array  # [N, K] int32 ring buffer of the most recent neighbours
    nbr_time: Array  # [N, K]
    nbr_feat: Array  # [N, K, F]
    nbr_valid: Array  # [N, K] bool
    nbr_ptr: Array  # [N] int32 next write slot
    pres_count: Array  # [N] number of recorded increments
    pres_sum: Array  # [N, D] ΣΔ
    pres_sumsq: Array  # [N, D] ΣΔ²


def init_tgn_state(num_nodes: int, memory_dim: int, edge_dim: int, num_neighbors: int) -> TGNState:
    """Zero memory (TGN's ``__init_memory__``), empty buffers and an empty PRES filter."""
    n, d, f, k = num_nodes, memory_dim, edge_dim, num_neighbors
    z = jnp.zeros
    return TGNState(
        memory=z((n, d), jnp.float32),
        last_update=z((n,), jnp.float32),
        msg=z((n, 3 * d + f), jnp.float32),
        msg_time=z((n,), jnp.float32),
        has_msg=z((n,), bool),
        nbr_id=z((n, k), jnp.int32),
        nbr_time=z((n, k), jnp.float32),
        nbr_feat=z((n, k, f), jnp.float32),
        nbr_valid=z((n, k), bool),
        nbr_ptr=z((n,), jnp.int32),
        pres_count=z((n,), jnp.float32),
        pres_sum=z((n, d), jnp.float32),
        pres_sumsq=z((n, d), jnp.float32),
    )


# --- pure functions ---------------------------------------------------------------------------


def gru_cell(p: dict, x: Float[Array, "N M"], h: Float[Array, "N D"]) -> Float[Array, "N D"]:
    """``torch.nn.GRUCell`` (TGN's memory updater), gates (r, z, n) along the last axis of
    ``kernel_i [M, 3D]``, ``kernel_h [D, 3D]``, ``bias_i``, ``bias_h [3D]``:
    ``r = σ(x W_ir + b_ir + h W_hr + b_hr)``, ``z`` likewise,
    ``n = tanh(x W_in + b_in + r (h W_hn + b_hn))``, ``h' = (1 − z) n + z h``."""
    gi = x @ p["kernel_i"] + p["bias_i"][None, :]
    gh = h @ p["kernel_h"] + p["bias_h"][None, :]
    d = h.shape[-1]
    r = jax.nn.sigmoid(gi[:, :d] + gh[:, :d])
    z = jax.nn.sigmoid(gi[:, d : 2 * d] + gh[:, d : 2 * d])
    n = jnp.tanh(gi[:, 2 * d :] + r * gh[:, 2 * d :])
    return (1.0 - z) * n + z * h


def minmax_normalize(x: Array) -> Array:
    """The official ``normalize``: ``2 (x − min) / (max − min) − 1`` over the whole tensor (left
    unchanged when it is constant, as the official code leaves an all-zero tensor)."""
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    return jnp.where(span > 0, 2.0 * (x - lo) / jnp.where(span > 0, span, 1.0) - 1.0, x)


def memory_coherence(new: Float[Array, "N D"], prev: Float[Array, "N D"], eps: float = 1e-8):
    """PRES's memory coherence as its official ``inner_prod``: both memories min–max normalised
    to [−1, 1], ``torch.nn.CosineSimilarity(dim=0)`` (cosine over nodes per memory dimension, the
    norms clamped at ``eps``), summed over dimensions and divided by ``N``; fp32 scalar."""
    a = minmax_normalize(new.astype(jnp.float32))
    b = minmax_normalize(prev.astype(jnp.float32))
    na = jnp.maximum(jnp.linalg.norm(a, axis=0), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=0), eps)
    cos = jnp.sum(a * b, axis=0) / (na * nb)
    return jnp.sum(cos) / new.shape[0]


def pres_filter_update(
    prev: Float[Array, "N D"],
    updated: Float[Array, "N D"],
    mask: Array,
    count: Float[Array, " N"],
    incr_sum: Float[Array, "N D"],
    incr_sumsq: Float[Array, "N D"],
    gamma: float | Array = 0.9,
):
    """One PRES prediction–correction step; returns ``(memory, count, ΣΔ, ΣΔ²)``.

    For nodes in ``mask`` (their memory was updated in this batch): prediction
    ``s_pred = prev + μ`` with ``μ = ΣΔ / max(n, 1)`` (zero before the first increment, as the
    official all-zero filter gives ``s_pred = prev``), correction
    ``s = γ s_pred + (1 − γ) updated``; the increment ``Δ = stop_gradient(s − prev)`` updates
    ``n += 1``, ``ΣΔ += Δ``, ``ΣΔ² += Δ²``. Other nodes keep ``updated`` and their statistics.
    The variance ``ΣΔ²/n − μ²`` of the increments is `pres_variance`.
    """
    m = mask[:, None]
    mu = incr_sum / jnp.maximum(count, 1.0)[:, None]
    pred = prev + mu
    fused = jnp.where(m, gamma * pred + (1.0 - gamma) * updated, updated)
    delta = jax.lax.stop_gradient(jnp.where(m, fused - prev, 0.0))
    return (
        fused,
        count + mask.astype(count.dtype),
        incr_sum + delta,
        incr_sumsq + delta * delta,
    )


def official_normalize(x: Array) -> Array:
    """The official filter's in-place normalisation ``x -= min; x /= max; x = 2x − 1`` over the
    whole tensor, skipped when ``max(x) == 0`` as there. A constant non-zero tensor (the official
    code divides 0 by 0 and gives NaN; not well defined) is left unchanged here."""
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    ok = (hi != 0) & (span > 0)
    return jnp.where(ok, 2.0 * (x - lo) / jnp.where(ok, span, 1.0) - 1.0, x)


def pres_official_blend(
    prev: Float[Array, "N D"],
    updated: Float[Array, "N D"],
    incr: Float[Array, "N D"],
    incr_sq: Float[Array, "N D"],
    gamma: float | Array = 0.9,
):
    """PRES's filter as the official ``MDGNN.compute_temporal_embeddings``; returns
    ``(blended memory [N, D], new increment sum, new squared-increment sum)``.

    ``T = official_normalize(incr)``; ``s_blend = γ (prev + T) + (1 − γ) updated`` for every node;
    ``c = official_normalize(stop_gradient(s_blend − prev))``; ``incr += 1 + c``,
    ``incr_sq += c²`` (the official ``Filter.update``). As in the official code the whole update
    (the ``+ 1`` included) is skipped when ``max(s_blend − prev) == 0`` — e.g. on the first
    batch of a fresh memory, where adding only the ``+ 1`` would leave a constant ``incr = 1``
    that the next batch adds, un-normalised, to every node's memory. ``s_blend`` is meant only as
    the input of the batch's embeddings; the stored memory stays ``updated``.
    """
    pred = prev + official_normalize(incr)
    blend = gamma * pred + (1.0 - gamma) * updated
    raw = jax.lax.stop_gradient(blend - prev)
    change = official_normalize(raw)
    ok = jnp.max(raw) != 0
    return (
        blend,
        jnp.where(ok, incr + 1.0 + change, incr),
        jnp.where(ok, incr_sq + change * change, incr_sq),
    )


def pres_variance(count: Array, incr_sum: Array, incr_sumsq: Array) -> Array:
    """Per-node, per-dimension variance of the recorded memory increments (biased)."""
    n = jnp.maximum(count, 1.0)[:, None]
    mu = incr_sum / n
    return jnp.maximum(incr_sumsq / n - mu * mu, 0.0)


def aggregate_last(nodes: Int[Array, " M"], values: Array, num_nodes: int):
    """TGN's "last" aggregator: per node the value of its latest entry (entries in time order;
    the largest index wins). Returns ``(per-node values [N, ...], has_entry [N])``."""
    pos = jnp.arange(nodes.shape[0], dtype=jnp.int32)
    last = jnp.full((num_nodes,), -1, jnp.int32).at[nodes].max(pos)
    has = last >= 0
    return values[jnp.maximum(last, 0)], has


def update_neighbors(state: TGNState, src, dst, t, feat) -> TGNState:
    """Append each event to both endpoints' ring buffers of ``K`` most recent neighbours, in
    time order (when a node has more than ``K`` entries in the batch only its last ``K`` are
    written, so no two writes share a slot)."""
    n, k = state.nbr_id.shape
    b = src.shape[0]
    node = jnp.concatenate([src, dst])  # [2b], entry 2i-th… in time order by event index
    other = jnp.concatenate([dst, src])
    order = jnp.concatenate([jnp.arange(b), jnp.arange(b)]) * 2 + jnp.repeat(jnp.arange(2), b)
    same = node[:, None] == node[None, :]  # [2b, 2b]
    earlier = order[None, :] < order[:, None]
    rank = jnp.sum(same & earlier, axis=1)  # earlier entries of the same node in this batch
    total = jnp.sum(same, axis=1)
    keep = rank >= total - k
    slot = (state.nbr_ptr[node] + rank) % k
    # dropped entries are sent out of bounds (mode="drop")
    row = jnp.where(keep, node, n)
    tt = jnp.concatenate([t, t])
    ff = jnp.concatenate([feat, feat])
    counts = jnp.zeros((n,), jnp.int32).at[node].add(1)
    return state._replace(
        nbr_id=state.nbr_id.at[row, slot].set(other.astype(jnp.int32), mode="drop"),
        nbr_time=state.nbr_time.at[row, slot].set(tt, mode="drop"),
        nbr_feat=state.nbr_feat.at[row, slot].set(ff, mode="drop"),
        nbr_valid=state.nbr_valid.at[row, slot].set(True, mode="drop"),
        nbr_ptr=(state.nbr_ptr + counts) % k,
    )


# --- modules ----------------------------------------------------------------------------------


def _time_frequencies(key, shape, dtype=jnp.float32):
    """TGN/TGAT's fixed start: ω = 1 / 10^linspace(0, 9, D) (learned afterwards)."""
    del key
    return jnp.asarray(1.0 / 10 ** np.linspace(0, 9, shape[0]), dtype)


class TimeEncoding(nn.Module):
    """TGAT/TGN time encoding (https://arxiv.org/abs/2002.07962): ``cos(ω Δt + b)`` with learned
    ``ω`` (start ``1/10^linspace(0, 9, D)``) and ``b`` (start 0).

    Attributes:
      dim: output features ``D``.
      dtype: output dtype (the cosine is computed in fp32).
    """

    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, dt: Float[Array, "*S"]) -> Float[Array, "*S D"]:
        w = self.param("frequency", _time_frequencies, (self.dim,))
        b = self.param("phase", nn.initializers.zeros, (self.dim,))
        row = (1,) * dt.ndim + (self.dim,)  # rank-explicit broadcast
        out = jnp.cos(dt.astype(jnp.float32)[..., None] * w.reshape(row) + b.reshape(row))
        return out.astype(self.dtype or jnp.float32)


def _torch_uniform(fan: int):
    bound = 1.0 / np.sqrt(fan)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class GRUMemoryUpdater(nn.Module):
    """TGN's GRU memory updater (``torch.nn.GRUCell(message_dim, memory_dim)``, its uniform
    ±1/√D init) as the pure `gru_cell`; the update is computed in fp32 (the memory is state).

    Attributes:
      memory_dim: ``D``.
    """

    memory_dim: int

    @nn.compact
    def __call__(self, messages: Float[Array, "N M"], memory: Float[Array, "N D"]):
        d, m = self.memory_dim, messages.shape[-1]
        init = _torch_uniform(d)
        p = {
            "kernel_i": self.param("kernel_i", init, (m, 3 * d)),
            "kernel_h": self.param("kernel_h", init, (d, 3 * d)),
            "bias_i": self.param("bias_i", init, (3 * d,)),
            "bias_h": self.param("bias_h", init, (3 * d,)),
        }
        return gru_cell(p, messages.astype(jnp.float32), memory.astype(jnp.float32))


class MergeLayer(nn.Module):
    """TGN's MergeLayer: ``fc2(relu(fc1([x1, x2])))`` (Xavier-normal kernels).

    Attributes:
      hidden: ``fc1`` width.
      out: ``fc2`` width.
      dtype: compute dtype.
    """

    hidden: int
    out: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x1: Array, x2: Array) -> Array:
        init = nn.initializers.xavier_normal()
        h = jnp.concatenate([x1, x2], axis=-1)
        h = nn.relu(nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype, name="fc1")(h))
        return nn.Dense(self.out, kernel_init=init, dtype=self.dtype, name="fc2")(h)


class TemporalAttention(nn.Module):
    """TGN's temporal graph attention layer (one layer, ``n_layers=1``).

    Query ``[h_i, φ(0)]``; keys/values ``[h_j, e_ij, φ(t − t_j)]`` of the ``K`` most recent
    neighbours; ``torch.nn.MultiheadAttention`` (embed ``2D``, ``num_heads``, dropout on the
    weights, output projection); a node without neighbours gets a zero attention output; then
    ``MergeLayer([attn, h_i]) -> D``.

    Attributes:
      dim: node feature (memory) width ``D``; the time encoding is ``D`` wide as in TGN.
      num_heads: attention heads (official 2).
      dropout: attention dropout (official 0.1).
      deterministic: no dropout.
      dtype: compute dtype.
    """

    dim: int
    num_heads: int = 2
    dropout: float = 0.1
    deterministic: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, h, t_query, nbr_h, nbr_feat, nbr_time, nbr_valid, time_enc):
        e = 2 * self.dim
        hd = e // self.num_heads
        dt = self.dtype
        q_in = jnp.concatenate(
            [h, time_enc(jnp.zeros_like(t_query)).astype(h.dtype)], axis=-1
        )  # [Q, 2D]
        delta = t_query[:, None] - nbr_time  # [Q, K]
        kv = jnp.concatenate(
            [nbr_h, nbr_feat.astype(h.dtype), time_enc(delta).astype(h.dtype)], -1
        )  # [Q, K, *]
        q = nn.DenseGeneral((self.num_heads, hd), dtype=dt, name="query")(q_in)  # [Q, H, hd]
        k = nn.DenseGeneral((self.num_heads, hd), dtype=dt, name="key")(kv)  # [Q, K, H, hd]
        v = nn.DenseGeneral((self.num_heads, hd), dtype=dt, name="value")(kv)
        logits = jnp.einsum("qhd,qkhd->qhk", q, k).astype(jnp.float32) / np.sqrt(hd)
        logits = jnp.where(nbr_valid[:, None, :], logits, -1e30)
        w = jax.nn.softmax(logits, axis=-1)
        w = nn.Dropout(self.dropout)(w, deterministic=self.deterministic)
        attn = jnp.einsum("qhk,qkhd->qhd", w.astype(v.dtype), v)
        attn = nn.DenseGeneral(e, axis=(-2, -1), dtype=dt, name="out")(attn)  # [Q, 2D]
        attn = jnp.where(jnp.any(nbr_valid, axis=1)[:, None], attn, 0.0)
        return MergeLayer(self.dim, self.dim, dtype=dt, name="merger")(attn, h)


class TGNStep(nn.Module):
    """One temporal batch of a TGN with optional PRES (`tgn_step` semantics, see the module
    docstring): ``(state, events) -> (new_state, (pos_logit [b], neg_logit [b], coherence))``.

    ``events`` is ``[b, 4 + F]``: source, destination, negative destination (as floats), time,
    edge features; rows with a negative source are padding (no prediction used, no update).

    Attributes:
      num_nodes: ``N``.
      memory_dim: ``D`` (also the embedding and time-encoding width, as TGN with node
        features of the memory's width).
      edge_dim: ``F``.
      message_dim: MLP message width (``message_function="mlp"``).
      message_function: "identity" (official default) or "mlp".
      num_neighbors: ``K`` most recent neighbours attended (official 10).
      num_heads, dropout: temporal attention (official 2, 0.1).
      use_pres: the PRES prediction–correction filter.
      pres_gamma: the blend weight of the prediction (official 0.9).
      pres_mode: "official" (the blend of all nodes feeds only the embeddings,
        `pres_official_blend`) or "stored" (the batch's updated nodes are blended with their
        running-mean increment and stored, `pres_filter_update`).
      coherence_stop_gradient: the official detached coherence term.
      deterministic: no dropout.
      dtype: compute dtype of the embedding and head (the memory stays fp32).
    """

    num_nodes: int
    memory_dim: int
    edge_dim: int
    message_dim: int = 100
    message_function: str = "identity"
    num_neighbors: int = 10
    num_heads: int = 2
    dropout: float = 0.1
    use_pres: bool = False
    pres_gamma: float = 0.9
    pres_mode: str = "official"
    coherence_stop_gradient: bool = False
    deterministic: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, state: TGNState, events: Float[Array, "b C"]):
        n, d, f = self.num_nodes, self.memory_dim, self.edge_dim
        if self.message_function not in MESSAGE_FUNCTIONS:
            raise ValueError(f"TGNStep: message_function must be one of {MESSAGE_FUNCTIONS}, "
                             f"got {self.message_function!r}")  # fmt: skip
        if self.pres_mode not in PRES_MODES:
            raise ValueError(f"TGNStep: pres_mode must be one of {PRES_MODES}, "
                             f"got {self.pres_mode!r}")  # fmt: skip
        if events.ndim != 2 or events.shape[-1] != 4 + f:
            raise ValueError(f"TGNStep: events must be [b, 4 + edge_dim] = [b, {4 + f}] "
                             f"(src, dst, neg, t, features), got {events.shape}")  # fmt: skip
        valid = events[:, 0] >= 0
        src = jnp.clip(events[:, 0].astype(jnp.int32), 0, n - 1)
        dst = jnp.clip(events[:, 1].astype(jnp.int32), 0, n - 1)
        neg = jnp.clip(events[:, 2].astype(jnp.int32), 0, n - 1)
        t = events[:, 3].astype(jnp.float32)
        feat = events[:, 4:].astype(jnp.float32)
        time_enc = TimeEncoding(d, dtype=jnp.float32, name="time_encoder")

        # 1. memory update with the messages the previous batch left (update at start)
        prev = state.memory
        msg = state.msg
        if self.message_function == "mlp":
            r = msg.shape[-1]
            msg = nn.relu(nn.Dense(r // 2, name="message_fc1")(msg))
            msg = nn.Dense(self.message_dim, name="message_fc2")(msg)
        updated = GRUMemoryUpdater(d, name="memory_updater")(msg, prev)
        has = state.has_msg
        mem = jnp.where(has[:, None], updated, prev)
        last_update = jnp.where(has, state.msg_time, state.last_update)
        count, s1, s2 = state.pres_count, state.pres_sum, state.pres_sumsq
        emb_mem = mem
        if self.use_pres and self.pres_mode == "stored":
            mem, count, s1, s2 = pres_filter_update(prev, mem, has, count, s1, s2, self.pres_gamma)
            emb_mem = mem
        elif self.use_pres:
            emb_mem, s1, s2 = pres_official_blend(prev, mem, s1, s2, self.pres_gamma)
            count = count + 1.0
        coh = memory_coherence(mem, prev)
        if self.coherence_stop_gradient:
            coh = jax.lax.stop_gradient(coh)

        # 2. embeddings of the batch's nodes from the memory *before* this batch's events
        q = jnp.concatenate([src, dst, neg])  # [3b]
        tq = jnp.concatenate([t, t, t])
        nbr = state.nbr_id[q]  # [3b, K]
        attn = TemporalAttention(d, self.num_heads, self.dropout, self.deterministic,
                                 dtype=self.dtype, name="embedding")  # fmt: skip
        cast = (lambda a: a.astype(self.dtype)) if self.dtype is not None else (lambda a: a)
        emb = attn(cast(emb_mem[q]), tq, cast(emb_mem[nbr]), state.nbr_feat[q], state.nbr_time[q],
                   state.nbr_valid[q], time_enc)  # fmt: skip
        b = src.shape[0]
        e_src, e_dst, e_neg = emb[:b], emb[b : 2 * b], emb[2 * b :]
        head = MergeLayer(d, 1, dtype=self.dtype, name="affinity_score")
        pos_logit = head(e_src, e_dst)[:, 0]
        neg_logit = head(e_src, e_neg)[:, 0]

        # 3. the batch's raw messages and neighbours enter the state only now
        mem_sg = jax.lax.stop_gradient(mem)
        pad = jnp.where(valid, 0, n)  # padding rows are sent out of range (dropped)
        raw_src = jnp.concatenate([mem_sg[src], mem_sg[dst], feat,
                                   time_enc(t - last_update[src])], -1)  # fmt: skip
        raw_dst = jnp.concatenate([mem_sg[dst], mem_sg[src], feat,
                                   time_enc(t - last_update[dst])], -1)  # fmt: skip
        nodes = jnp.stack([src + pad, dst + pad], 1).reshape(-1)  # [2b] in time order
        raws = jnp.stack([raw_src, raw_dst], 1).reshape(2 * b, -1)
        times = jnp.repeat(t, 2)
        new_msg, new_has = aggregate_last(jnp.minimum(nodes, n), raws, n + 1)
        new_time, _ = aggregate_last(jnp.minimum(nodes, n), times, n + 1)
        new_state = state._replace(
            memory=mem_sg,
            last_update=jax.lax.stop_gradient(last_update),
            msg=jax.lax.stop_gradient(new_msg[:n]),
            msg_time=new_time[:n],
            has_msg=new_has[:n],
            pres_count=count,
            pres_sum=s1,
            pres_sumsq=s2,
        )
        kept = valid
        new_state = update_neighbors(
            new_state,
            jnp.where(kept, src, n),
            jnp.where(kept, dst, n),
            t,
            feat,
        )
        return new_state, (pos_logit, neg_logit, coh)


class TGN(nn.Module):
    """TGN (https://arxiv.org/abs/2006.10637) with optional PRES (https://arxiv.org/abs/2402.04284)
    over a stream of temporal batches, its state in the ``"memory"`` collection.

    Each call processes one temporal batch (`TGNStep`) and, when ``"memory"`` is mutable,
    stores the new state; reset the stream by re-initialising that collection
    (`init_tgn_state`). For training on windows of consecutive batches under `jax.jit`, see
    `jaxblocks.models.tgn.TGNLinkPredictor` (the same step in a scan).

    Attributes:
      step: keyword arguments of `TGNStep` (num_nodes, memory_dim, edge_dim, ...).

    Example::

        tgn = TGN(dict(num_nodes=8, memory_dim=4, edge_dim=2, num_neighbors=3))
        v = tgn.init(key, events)                       # events [b, 6]
        (pos, neg, coh), v2 = tgn.apply(v, events, mutable=["memory"])
    """

    step: dict

    @nn.compact
    def __call__(self, events: Float[Array, "b C"], train: bool = False):
        kw = dict(self.step)
        st = self.variable("memory", "state", init_tgn_state, kw["num_nodes"], kw["memory_dim"],
                           kw["edge_dim"], kw.get("num_neighbors", 10))  # fmt: skip
        new, out = TGNStep(**kw, deterministic=not train, name="step")(st.value, events)
        if self.is_mutable_collection("memory") and not self.is_initializing():
            st.value = new
        return out
