"""Binary layers and MST-compression (Vo et al., ICCV 2023, https://arxiv.org/abs/2308.13735).

A binary convolution with ±1 weights and ±1 activations is an XNOR-popcount; output channels
whose sign patterns are close can share work: for ±1 weights, channel ``j`` equals channel
``p`` minus twice the partial sum over the positions where ``j`` differs from ``p``,

    out_j = out_p − 2 · Σ_{k : w_jk ≠ w_pk} w_pk · x_k          (since w_jk = −w_pk there).

MST-compression builds the complete graph over output channels with Hamming edge weights
(`hamming_distances`), takes its minimum spanning tree, roots it where the tree is shallowest
(`mst_plan`; depth is latency on hardware) and evaluates the root densely and every other
channel from its parent (`delta_conv`, exact). `count_ops` compares the operation counts and
`mst_distance_penalty` is the training regulariser that shrinks the total MST distance.

The layers (`BinaryConv`, `BinaryDense`) binarise latent real weights (and optionally the
activations) with the straight-through estimator of BNN / XNOR-Net (`binarize`) and can scale
each output channel by ``α = mean|W|`` (XNOR-Net, https://arxiv.org/abs/1603.05279).

No official code of the paper was found; the planner, the exact delta evaluation and the
regulariser are written from the paper's description (see each function for the choices made).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax import lax

from jaxblocks.typing import Array, Float, Int

__all__ = [
    "binarize",
    "binary_conv",
    "binary_dense",
    "BinaryConv",
    "BinaryDense",
    "hamming_distances",
    "MSTPlan",
    "mst_plan",
    "delta_conv",
    "count_ops",
    "relaxed_hamming",
    "mst_distance_penalty",
]

Padding = str | int | Sequence[int | tuple[int, int]]
_CONV_AXES = (None, None, "conv_in", "conv_out")
_DENSE_AXES = ("embed", "mlp")


# --------------------------------------------------------------------------------------------
# Binarisation and the binary linear maps
# --------------------------------------------------------------------------------------------


@jax.custom_jvp
def binarize(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """Sign with the straight-through estimator, MST-compression (https://arxiv.org/abs/2308.13735).

    The estimator is the clipped one of BNN (Hubara et al., https://arxiv.org/abs/1602.02830),
    also used by XNOR-Net (https://arxiv.org/abs/1603.05279).

    The forward pass returns ``+1`` where ``x >= 0`` (so ``sign(0) = +1``: a binary network has
    no zero) and ``-1`` elsewhere, in ``x``'s dtype. The gradient is the one of the hard tanh,
    ``1`` where ``|x| <= 1`` (ends included) and ``0`` outside, so latent weights that have
    drifted far past ±1 stop moving.

    Args:
      x: a floating-point array.

    Returns:
      ±1 values with the shape and dtype of ``x``.

    Example::

        w = binarize(jnp.array([-0.3, 0.0, 2.0]))   # [-1, 1, 1]
    """
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@binarize.defjvp
def _binarize_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    inside = (jnp.abs(x) <= 1).astype(t.dtype)
    return binarize(x), t * inside


def _pairs(name: str, value: int | Sequence[int], where: str) -> tuple[int, int]:
    v = (value, value) if isinstance(value, int) else tuple(value)
    if len(v) != 2 or not all(isinstance(a, int) and a >= 1 for a in v):
        raise ValueError(
            f"{where}: {name} must be a positive int or 2 positive ints, got {value!r}"
        )
    return v  # type: ignore[return-value]


def _explicit_padding(
    padding: Padding,
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    where: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``padding`` as two ``(low, high)`` pairs, resolving "SAME"/"VALID" like XLA does."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{where}: padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
        pads = lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    if isinstance(padding, int):
        padding = (padding, padding)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(
            f"{where}: padding must be 'SAME', 'VALID', an int, or 2 non-negative (low, high) "
            f"pairs, got {padding!r}"
        )
    return pads  # type: ignore[return-value]


def _output_hw(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
    out = tuple(
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads, strict=True)
    )
    return out  # type: ignore[return-value]


def _channel_scale(latent_kernel: Array) -> Array:
    """XNOR-Net's per-output-channel ``α = mean|W|`` (fp32, shape ``[cout]``)."""
    w = jnp.abs(latent_kernel.astype(jnp.float32))
    return jnp.mean(w.reshape(-1, w.shape[-1]), axis=0)


def _check_conv_args(x: Any, kernel: Any, where: str) -> None:
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(
            f"{where}: x must have shape [batch, height, width, channels], got shape "
            f"{getattr(x, 'shape', type(x).__name__)}"
        )
    if not hasattr(kernel, "ndim") or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"{where}: kernel must have shape [kh, kw, cin={x.shape[-1]}, cout] for x of shape "
            f"{tuple(x.shape)}, got shape {getattr(kernel, 'shape', type(kernel).__name__)}"
        )


def binary_conv(
    x: Float[Array, "B H W C"],
    latent_kernel: Float[Array, "kh kw C F"],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    binarize_inputs: bool = True,
    scale_weights: bool = True,
) -> Float[Array, "B Ho Wo F"]:
    """The binary convolution of MST-compression (https://arxiv.org/abs/2308.13735), a pure
    function: ``conv(sign(x), sign(W)) · α`` with ``α = mean|W|`` per output channel.

    Zero padding stays zero (it is not binarised), as in XNOR-Net and BNN. The products are ±1
    and are accumulated in fp32 (exact integers below 2^24), then cast to ``x``'s dtype.

    Args:
      x: channels-last input.
      latent_kernel: real weights ``[kh, kw, cin, cout]``; their signs are used.
      strides: an int or 2 ints.
      padding: ``"SAME"``, ``"VALID"``, an int or 2 ``(low, high)`` pairs (zero padding).
      binarize_inputs: binarise ``x`` too (a fully binary layer; the first layer of a BNN
        usually keeps real inputs).
      scale_weights: multiply each output channel by ``α``.

    Returns:
      The convolution output, ``[B, Ho, Wo, cout]`` in ``x``'s dtype.
    """
    where = "binary_conv"
    _check_conv_args(x, latent_kernel, where)
    st = _pairs("strides", strides, where)
    pads = _explicit_padding(padding, x.shape[1:3], latent_kernel.shape[:2], st, where)
    xb = binarize(x) if binarize_inputs else x
    y = lax.conv_general_dilated(
        xb,
        binarize(latent_kernel).astype(xb.dtype),
        window_strides=st,
        padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,  # keeps ±1 × real inputs exact on TF32 hardware
        preferred_element_type=jnp.float32,
    )
    if scale_weights:
        y = y * _channel_scale(latent_kernel).reshape(1, 1, 1, -1)
    return y.astype(x.dtype)


def binary_dense(
    x: Float[Array, "... C"],
    latent_kernel: Float[Array, "C F"],
    *,
    binarize_inputs: bool = True,
    scale_weights: bool = True,
) -> Float[Array, "... F"]:
    """The dense form of `binary_conv` (https://arxiv.org/abs/2308.13735): ``sign(x) @ sign(W)
    · α``, accumulated in fp32."""
    if not hasattr(x, "ndim") or x.ndim < 1:
        raise ValueError(
            f"binary_dense: x must have shape [..., cin], got {getattr(x, 'shape', x)}"
        )
    if (
        not hasattr(latent_kernel, "ndim")
        or latent_kernel.ndim != 2
        or (latent_kernel.shape[0] != x.shape[-1])
    ):
        raise ValueError(
            f"binary_dense: latent_kernel must have shape [cin={x.shape[-1]}, cout], got shape "
            f"{getattr(latent_kernel, 'shape', type(latent_kernel).__name__)}"
        )
    xb = binarize(x) if binarize_inputs else x
    y = jnp.einsum(
        "...i,io->...o",
        xb,
        binarize(latent_kernel).astype(xb.dtype),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if scale_weights:
        y = y * _channel_scale(latent_kernel).reshape((1,) * (y.ndim - 1) + (-1,))
    return y.astype(x.dtype)


def _compute_dtype(dtype: Any, x: Array) -> Any:
    if dtype is not None:
        return dtype
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _existing_kernel_check(module: nn.Module, shape: tuple[int, ...], what: str) -> None:
    if module.has_variable("params", "kernel"):
        have = tuple(meta.unbox(module.get_variable("params", "kernel")).shape)
        if have != shape:
            raise ValueError(
                f"{module.__class__.__name__}: {what} needs a kernel of shape {shape}, but "
                f"params['kernel'] has shape {have}"
            )


class BinaryConv(nn.Module):
    """Binary 2D convolution of MST-compression (Vo et al., https://arxiv.org/abs/2308.13735).

    Unlike ``nn.Conv``, the stored kernel is a latent real tensor whose signs are used in the
    forward pass (`binarize`, clipped STE in the backward pass); the input is binarised too
    unless ``binarize_inputs=False``, and each output channel is scaled by XNOR-Net's
    ``α = mean|W|``. XNOR-Net's activation scale ``K`` is left out (as in Bi-Real Net and
    ReActNet): it breaks the pure XNOR-popcount form that MST-compression reorders. Channels-last.
    `mst_plan` / `delta_conv` take ``binarize(params["kernel"])``.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: an int or 2 ints.
      padding: ``"SAME"``, ``"VALID"``, an int or 2 ``(low, high)`` pairs (zero padding).
      binarize_inputs: binarise the activations as well as the weights.
      scale_weights: multiply each output channel by ``α = mean|W|``.
      use_bias: add a real bias after the scaling.
      dtype: compute dtype (None: the input's, integer inputs promoted to float32).
      param_dtype: storage dtype of the latent kernel.
      kernel_init, bias_init: initializers.

    Variables: params ``kernel`` ``[kh, kw, cin, features]`` (logical axes ``(None, None,
    "conv_in", "conv_out")``), optional ``bias``.

    Example::

        layer = BinaryConv(32, (3, 3))
        variables = layer.init(jax.random.key(0), x)
        y = layer.apply(variables, x)
        plan = mst_plan(binarize(variables["params"]["kernel"]))
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    binarize_inputs: bool = True
    scale_weights: bool = True
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B Ho Wo F"]:
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(
                f"BinaryConv: x must have shape [batch, height, width, channels], got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        kh, kw = _pairs("kernel_size", self.kernel_size, "BinaryConv")
        shape = (kh, kw, x.shape[-1], self.features)
        _existing_kernel_check(self, shape, f"x with {x.shape[-1]} channels")
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, _CONV_AXES), shape,
            self.param_dtype,
        )  # fmt: skip
        dtype = _compute_dtype(self.dtype, x)
        y = binary_conv(
            x.astype(dtype),
            kernel,
            strides=self.strides,
            padding=self.padding,
            binarize_inputs=self.binarize_inputs,
            scale_weights=self.scale_weights,
        )
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, ("conv_out",)),
                (self.features,), self.param_dtype,
            )  # fmt: skip
            y = y + bias.astype(dtype).reshape(1, 1, 1, -1)
        return y


class BinaryDense(nn.Module):
    """Binary dense layer of MST-compression (Vo et al., https://arxiv.org/abs/2308.13735).

    The dense sibling of `BinaryConv`: ``sign(x) @ sign(W) · α`` with a latent real kernel
    ``[cin, features]`` (logical axes ``("embed", "mlp")``), the clipped STE, optional input
    binarisation, XNOR-Net scaling and bias. `mst_plan` works on its binarised kernel too.

    Attributes:
      features: output features.
      binarize_inputs, scale_weights, use_bias, dtype, param_dtype, kernel_init, bias_init: as in
        `BinaryConv`.

    Example::

        y, variables = BinaryDense(10).init_with_output(jax.random.key(0), x)
    """

    features: int
    binarize_inputs: bool = True
    scale_weights: bool = True
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... F"]:
        if not hasattr(x, "ndim") or x.ndim < 1:
            raise ValueError(f"BinaryDense: x must have shape [..., features], got {x!r}")
        shape = (x.shape[-1], self.features)
        _existing_kernel_check(self, shape, f"x with {x.shape[-1]} features")
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, _DENSE_AXES), shape,
            self.param_dtype,
        )  # fmt: skip
        dtype = _compute_dtype(self.dtype, x)
        y = binary_dense(
            x.astype(dtype),
            kernel,
            binarize_inputs=self.binarize_inputs,
            scale_weights=self.scale_weights,
        )
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, (_DENSE_AXES[1],)),
                (self.features,), self.param_dtype,
            )  # fmt: skip
            y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y


# --------------------------------------------------------------------------------------------
# The channel graph and its minimum spanning tree
# --------------------------------------------------------------------------------------------


def _check_kernel(kernel: Any, where: str) -> None:
    if not hasattr(kernel, "ndim") or kernel.ndim < 2:
        raise ValueError(
            f"{where}: binary_kernel must have shape [..., cin, cout] (2D dense or 4D conv), got "
            f"shape {getattr(kernel, 'shape', type(kernel).__name__)}"
        )


def hamming_distances(binary_kernel: Float[Array, "... F"]) -> Int[Array, "F F"]:
    """Edge weights of MST-compression's channel graph (https://arxiv.org/abs/2308.13735): the
    number of weights in which two output channels differ.

    Channels are the last axis; each is flattened to a sign vector (``w >= 0`` is ``+1``, so a
    latent real kernel gives the distances of its binarisation). Exact integer arithmetic
    (int32 counts from fp32 dots of 0/1 vectors); works under ``jit``.

    Args:
      binary_kernel: ``[..., cout]``, e.g. ``[kh, kw, cin, cout]`` or ``[cin, cout]``.

    Returns:
      ``D[i, j]``: int32 ``[cout, cout]``, symmetric with a zero diagonal.
    """
    _check_kernel(binary_kernel, "hamming_distances")
    w = jnp.asarray(binary_kernel)
    bits = (w >= 0).astype(jnp.float32).reshape(-1, w.shape[-1])  # [n, cout]
    same_pos = jnp.einsum("ni,nj->ij", bits, bits, precision=lax.Precision.HIGHEST)
    n_pos = jnp.sum(bits, axis=0)  # [cout]
    # |b_i xor b_j| = |b_i| + |b_j| − 2 <b_i, b_j>
    d = n_pos[:, None] + n_pos[None, :] - 2 * same_pos
    return jnp.round(d).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class MSTPlan:
    """The evaluation order of MST-compression (https://arxiv.org/abs/2308.13735), host-side.

    Attributes:
      root: the channel computed densely.
      parents: int64 ``[cout]``; ``parents[j]`` is the channel ``j`` is computed from (``-1`` at
        the root).
      order: int64 ``[cout]``, breadth-first from the root (every channel after its parent).
      node_depth: int64 ``[cout]``, hops from the root.
      depth: the tree depth (the longest chain of dependent channel computations).
      edge_distance: int64 ``[cout]``, the Hamming distance to the parent (0 at the root).
      total_distance: the MST weight, ``sum(edge_distance)``.
    """

    root: int
    parents: np.ndarray
    order: np.ndarray
    node_depth: np.ndarray
    depth: int
    edge_distance: np.ndarray
    total_distance: int


def _prim_np(dist: np.ndarray) -> np.ndarray:
    """Prim's MST from vertex 0 with deterministic ties (lowest index first, earliest parent
    kept); returns parents with ``-1`` at vertex 0."""
    c = dist.shape[0]
    in_tree = np.zeros(c, bool)
    in_tree[0] = True
    key = dist[0].astype(np.float64).copy()
    parent = np.zeros(c, np.int64)
    for _ in range(c - 1):
        u = int(np.argmin(np.where(in_tree, np.inf, key)))
        in_tree[u] = True
        better = ~in_tree & (dist[u] < key)
        key = np.where(better, dist[u], key)
        parent = np.where(better, u, parent)
    parent[0] = -1
    return parent


def _bfs(adj: list[list[int]], root: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breadth-first order, parents and hop depths from ``root``; neighbours in index order."""
    c = len(adj)
    parents = np.full(c, -1, np.int64)
    depth = np.full(c, -1, np.int64)
    depth[root] = 0
    order = [root]
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if depth[v] < 0:
                depth[v], parents[v] = depth[u] + 1, u
                order.append(v)
                queue.append(v)
    return np.asarray(order, np.int64), parents, depth


def _eccentricities(adj: list[list[int]]) -> np.ndarray:
    """Tree eccentricity of every vertex: ecc(v) = max(dist(v, a), dist(v, b)) for the two ends
    a, b of a longest path (found by two sweeps), O(cout)."""
    _, _, da = _bfs(adj, 0)
    a = int(np.argmax(da))
    _, _, from_a = _bfs(adj, a)
    b = int(np.argmax(from_a))
    _, _, from_b = _bfs(adj, b)
    return np.maximum(from_a, from_b)


def mst_plan(binary_kernel: Float[Array, "... F"], root: int | None = None) -> MSTPlan:
    """Minimum spanning tree over output channels with the minimum-depth root, MST-compression
    (Vo et al., https://arxiv.org/abs/2308.13735).

    Host-side (numpy; ``binary_kernel`` must be concrete). The graph is complete over the
    ``cout`` output channels with `hamming_distances` as edge weights. The MST is Prim's from
    channel 0 with deterministic ties (the lowest channel index is added first, and an edge
    replaces a channel's current best only when strictly shorter). With ``root=None`` the root
    is the tree's centre, the channel of minimum eccentricity, which minimises the depth over all
    roots of this tree (lowest index on ties). When several MSTs tie in weight, only the one Prim
    picks is considered; a shallower tree of equal weight may exist (the paper does not say how
    it breaks such ties).

    Args:
      binary_kernel: ``[..., cout]`` (signs are used, so a latent kernel works too).
      root: force the root channel (None: the minimum-depth one).

    Returns:
      An `MSTPlan`.

    Example::

        plan = mst_plan(binarize(params["kernel"]))
        y = delta_conv(binarize(x), binarize(params["kernel"]), plan)
    """
    _check_kernel(binary_kernel, "mst_plan")
    dist = np.asarray(hamming_distances(np.asarray(binary_kernel)), np.int64)
    c = dist.shape[0]
    if root is not None and (not isinstance(root, (int, np.integer)) or not 0 <= root < c):
        raise ValueError(f"mst_plan: root must be a channel index in [0, {c}), got {root!r}")
    tree = _prim_np(dist)
    adj: list[list[int]] = [[] for _ in range(c)]
    for j in range(1, c):
        adj[j].append(int(tree[j]))
        adj[int(tree[j])].append(j)
    for nbrs in adj:
        nbrs.sort()
    if root is None:
        root = int(np.argmin(_eccentricities(adj)))
    order, parents, node_depth = _bfs(adj, int(root))
    edge = np.where(parents >= 0, dist[np.arange(c), np.maximum(parents, 0)], 0).astype(np.int64)
    return MSTPlan(
        root=int(root),
        parents=parents,
        order=order,
        node_depth=node_depth,
        depth=int(node_depth.max()),
        edge_distance=edge,
        total_distance=int(edge.sum()),
    )


# --------------------------------------------------------------------------------------------
# Exact delta evaluation and operation counts
# --------------------------------------------------------------------------------------------


def _concrete_binary_kernel(kernel: Any, ndim: int, where: str) -> np.ndarray:
    try:
        w = np.asarray(kernel)
    except jax.errors.TracerArrayConversionError as e:
        raise ValueError(f"{where}: binary_kernel must be concrete (host-side planning)") from e
    if w.ndim != ndim:
        raise ValueError(
            f"{where}: binary_kernel must have shape [kh, kw, cin, cout], got shape {w.shape}"
        )
    if not np.all(np.abs(w) == 1):
        raise ValueError(
            f"{where}: binary_kernel must hold only ±1 values (use binarize(kernel)), got values "
            f"in [{w.min()}, {w.max()}] for shape {w.shape}"
        )
    return w


def _check_plan(plan: Any, cout: int, where: str) -> None:
    if not isinstance(plan, MSTPlan) or plan.parents.shape != (cout,):
        got = plan.parents.shape if isinstance(plan, MSTPlan) else type(plan).__name__
        raise ValueError(f"{where}: plan must be an MSTPlan over {cout} channels, got {got}")


def _patches(x: Array, kernel_hw, strides, pads) -> Array:
    """``[B, Ho, Wo, kh·kw·cin]`` input windows, flattened in the kernel's ``(kh, kw, cin)``
    order (so ``patches @ kernel.reshape(-1, cout)`` is the convolution)."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = _output_hw(x.shape[1:3], kernel_hw, strides, pads)
    cols = [
        xp[:, dy : dy + sh * (ho - 1) + 1 : sh, dx : dx + sw * (wo - 1) + 1 : sw, :]
        for dy in range(kh)
        for dx in range(kw)
    ]  # kh·kw × [B, Ho, Wo, cin]
    return jnp.stack(cols, axis=3).reshape(x.shape[0], ho, wo, -1)  # [B, Ho, Wo, kh·kw·cin]


def delta_conv(
    x_binary: Float[Array, "B H W C"],
    binary_kernel: Float[Array, "kh kw C F"],
    plan: MSTPlan,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
) -> Float[Array, "B Ho Wo F"]:
    """Exact MST-ordered evaluation of a binary convolution, MST-compression
    (https://arxiv.org/abs/2308.13735).

    The root channel is computed densely over all ``kh·kw·cin`` weights; then, in breadth-first
    order, channel ``j`` with parent ``p`` is ``out_p − 2 · Σ_{k ∈ diff(j, p)} w_pk · x_k``, where
    the sum runs only over the ``D[j, p]`` positions at which the two ±1 weight vectors differ
    (gathered from the input windows). The identity holds for any real ``x``; for ±1 inputs
    every value is an integer, so the result equals the dense binary convolution exactly in
    fp32 (below 2^24). A reference for the reordering, not a fast kernel: a Python loop over
    channels (traceable; the plan and kernel are static).

    Args:
      x_binary: channels-last input, typically ``binarize(x)``.
      binary_kernel: concrete ±1 kernel ``[kh, kw, cin, cout]``.
      plan: `mst_plan` of ``binary_kernel``.
      strides, padding: as in `binary_conv` (zero padding).

    Returns:
      fp32 ``[B, Ho, Wo, cout]``, equal to ``conv(x_binary, binary_kernel)``.
    """
    where = "delta_conv"
    w = _concrete_binary_kernel(binary_kernel, 4, where)
    _check_conv_args(x_binary, w, where)
    _check_plan(plan, w.shape[-1], where)
    st = _pairs("strides", strides, where)
    pads = _explicit_padding(padding, x_binary.shape[1:3], w.shape[:2], st, where)
    cols = _patches(jnp.asarray(x_binary, jnp.float32), w.shape[:2], st, pads)
    wf = w.reshape(-1, w.shape[-1]).astype(np.float32)  # [n, cout]
    dot = lambda a, b: jnp.einsum("bhwn,n->bhw", a, b, precision=lax.Precision.HIGHEST)
    out: dict[int, Array] = {plan.root: dot(cols, jnp.asarray(wf[:, plan.root]))}
    for j in plan.order[1:]:
        j, p = int(j), int(plan.parents[j])
        diff = np.flatnonzero(wf[:, j] != wf[:, p])  # the D[j, p] positions that change
        if diff.size == 0:
            out[j] = out[p]
            continue
        correction = dot(cols[..., diff], jnp.asarray(wf[diff, p]))  # [B, Ho, Wo]
        out[j] = out[p] - 2 * correction
    return jnp.stack([out[c] for c in range(w.shape[-1])], axis=-1)


def count_ops(
    binary_kernel: Float[Array, "... F"],
    plan: MSTPlan,
    input_hw: tuple[int, int] | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
) -> dict[str, float]:
    """Operation counts of dense vs MST-ordered evaluation, MST-compression
    (https://arxiv.org/abs/2308.13735).

    Per output position, a dense binary layer does ``n = kh·kw·cin`` XNOR (±1 multiply) +
    popcount-accumulate operations per output channel, ``n · cout`` in all. The MST evaluation
    does ``n`` for the root and, per other channel, one per differing weight plus one add/sub
    combining it with its parent's output: ``n + Σ_{j ≠ root} (D[j, parent(j)] + 1)``. The
    ``·2`` is a shift and is not counted; zero padding is counted like data (the same for both).

    Args:
      binary_kernel: ``[kh, kw, cin, cout]`` (conv) or ``[cin, cout]`` (dense).
      plan: `mst_plan` of the kernel.
      input_hw: the conv input's spatial size (None for a dense kernel: one output position).
      strides, padding: as in `binary_conv`.

    Returns:
      ``{"positions", "dense", "mst", "ratio"}``: output positions, total dense and MST
      operation counts and ``dense / mst`` (the speed-up in operations).
    """
    where = "count_ops"
    _check_kernel(binary_kernel, where)
    shape = tuple(np.shape(binary_kernel))
    _check_plan(plan, shape[-1], where)
    if len(shape) == 4:
        if input_hw is None or len(tuple(input_hw)) != 2:
            raise ValueError(f"{where}: input_hw must be (height, width) for a conv kernel of "
                             f"shape {shape}, got {input_hw!r}")  # fmt: skip
        st = _pairs("strides", strides, where)
        pads = _explicit_padding(padding, tuple(input_hw), shape[:2], st, where)
        positions = math.prod(_output_hw(tuple(input_hw), shape[:2], st, pads))
    elif len(shape) == 2:
        if input_hw is not None:
            raise ValueError(f"{where}: input_hw must be None for a dense kernel {shape}")
        positions = 1
    else:
        raise ValueError(f"{where}: binary_kernel must be [kh, kw, cin, cout] or [cin, cout], "
                         f"got shape {shape}")  # fmt: skip
    n, cout = math.prod(shape[:-1]), shape[-1]
    dense = positions * n * cout
    mst = positions * (n + int(plan.total_distance) + (cout - 1))
    return {"positions": positions, "dense": dense, "mst": mst, "ratio": dense / mst}


# --------------------------------------------------------------------------------------------
# The training regulariser
# --------------------------------------------------------------------------------------------


def _prim_parents(dist: Array) -> Array:
    """Jittable Prim from vertex 0 with the same tie-breaking as the host planner; int32
    parents (vertex 0 gets 0, callers mask it)."""
    c = dist.shape[0]
    d = dist.astype(jnp.float32)
    in_tree0 = jnp.zeros(c, bool).at[0].set(True)

    def step(_, state):
        in_tree, key, parent = state
        u = jnp.argmin(jnp.where(in_tree, jnp.inf, key))
        in_tree = in_tree.at[u].set(True)
        better = ~in_tree & (d[u] < key)
        return in_tree, jnp.where(better, d[u], key), jnp.where(better, u.astype(jnp.int32), parent)

    init = (in_tree0, d[0], jnp.zeros(c, jnp.int32))
    return lax.fori_loop(0, c - 1, step, init)[2]


def relaxed_hamming(latent_kernel: Float[Array, "... F"], temperature: float) -> Array:
    """``D̃[i, j] = Σ_k (1 − s_ki s_kj) / 2`` with ``s = tanh(W / T)``: the Hamming distance of
    the signs when ``T → 0``, smooth in ``W`` (fp32 ``[cout, cout]``)."""
    w = jnp.asarray(latent_kernel, jnp.float32)
    s = jnp.tanh(w / temperature).reshape(-1, w.shape[-1])  # [n, cout]
    gram = jnp.einsum("ni,nj->ij", s, s, precision=lax.Precision.HIGHEST)
    return (s.shape[0] - gram) / 2


def mst_distance_penalty(
    latent_kernel: Float[Array, "... F"],
    temperature: float = 1.0,
    edges: str = "mst",
) -> Float[Array, ""]:
    """Regulariser of MST-compression (https://arxiv.org/abs/2308.13735) that shrinks the total
    MST distance of a layer's binarised kernel during training.

    The Hamming distance is piecewise constant in the latent weights, so it is relaxed to
    `relaxed_hamming` (``Σ_k (1 − tanh(w_ki/T) tanh(w_kj/T)) / 2``). With ``edges="mst"`` (the
    paper's objective, the total MST distance) the tree is the MST of the current hard
    distances, rebuilt at every call by a jittable Prim with the planner's tie-breaking and
    treated as constant (no gradient through the choice of edges); the penalty is the relaxed
    weight of its edges. ``edges="all"`` sums the relaxed distance over all pairs ``i < j``
    instead (smoother, pulls every channel together). Deviation: the paper also reduces the tree
    depth during training; that term is not implemented here (`mst_plan` still picks the
    minimum-depth root). Add ``λ · penalty`` per layer to the task loss.

    Args:
      latent_kernel: the layer's real kernel ``[..., cout]`` (``[kh, kw, cin, cout]`` for
        `BinaryConv`, ``[cin, cout]`` for `BinaryDense`).
      temperature: ``T > 0``; smaller is closer to the hard distance but with sparser gradients.
      edges: ``"mst"`` or ``"all"``.

    Returns:
      A non-negative fp32 scalar (unnormalised: a count of relaxed differing weights).

    Example::

        loss = task_loss + 1e-4 * mst_distance_penalty(params["conv"]["kernel"])
    """
    _check_kernel(latent_kernel, "mst_distance_penalty")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"mst_distance_penalty: temperature must be > 0, got {temperature!r}")
    if edges not in ("mst", "all"):
        raise ValueError(f"mst_distance_penalty: edges must be 'mst' or 'all', got {edges!r}")
    relaxed = relaxed_hamming(latent_kernel, temperature)
    c = relaxed.shape[0]
    if edges == "all":
        return jnp.sum(jnp.triu(relaxed, k=1))
    parents = _prim_parents(hamming_distances(lax.stop_gradient(latent_kernel)))
    child_edges = relaxed[jnp.arange(c), parents]  # [cout]; vertex 0 is the Prim root
    return jnp.sum(jnp.where(jnp.arange(c) > 0, child_edges, 0.0))
