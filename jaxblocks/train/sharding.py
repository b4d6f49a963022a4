"""Device mesh, logical axis rules and `NamedSharding`s for the trainer.

The mesh has four named axes, always in this order: ``data`` (pure data parallelism), ``fsdp``
(data parallelism whose parameters and optimizer state are sharded too, ZeRO-3 style),
``tensor`` (Megatron-style model parallelism of hidden dimensions) and ``sequence`` (context
parallelism: ring attention over the time axis). Meshes are built with `AxisType.Auto` because
Flax Linen's `nn.with_logical_constraint` and `jax.shard_map` assert instead of resharding on
`Explicit` meshes (the `jax.make_mesh` default since jax 0.9).

Models name their parameter and activation axes logically (``"embed"``, ``"mlp"``, ``"heads"``
...); `LOGICAL_AXIS_RULES` maps those names to mesh axes. Parameters a model did not annotate get
a big_vision-style FSDP default: their largest dimension divisible by the ``fsdp`` axis size is
split over ``fsdp``; everything else is replicated.

`sbp_to_pspec` is a small OneFlow-SBP vocabulary (arXiv:2110.15032) on top of
`jax.sharding.PartitionSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")
# Axes a global batch is split over: every data-parallel replica gets its own examples.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical name -> mesh axis (or None = replicated). First match wins, as in `nn.logical_axis_rules`.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("act_batch", BATCH_AXES),
    ("length", "sequence"),
    ("act_length", "sequence"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("classes", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int | None = None) -> tuple[int, ...]:
    """Resolve the mesh axis sizes; one axis may be ``-1`` ("all remaining devices").

    Raises ValueError with the numbers involved when the sizes do not multiply to the device count.
    """
    n = jax.device_count() if num_devices is None else num_devices
    unknown = [k for k in MESH_AXES if int(mesh_cfg.get(k, 1)) == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {unknown} in {dict(mesh_cfg)}")
    for k in mesh_cfg:
        if k not in MESH_AXES:
            raise ValueError(f"mesh: unknown axis {k!r}; the mesh axes are {MESH_AXES}")
    sizes = {k: int(mesh_cfg.get(k, 1)) for k in MESH_AXES}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ValueError(f"mesh: axis {k!r} has size {v}; sizes must be >= 1 or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if unknown:
        if n % known:
            raise ValueError(
                f"mesh: {n} devices are not divisible by the fixed axis sizes (product {known}) "
                f"of {sizes}"
            )
        sizes[unknown[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
            f"but there are {n} devices"
        )
    return tuple(sizes[k] for k in MESH_AXES)


def make_mesh(
    mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None
) -> jax.sharding.Mesh:
    """A `data × fsdp × tensor × sequence` mesh with `AxisType.Auto` axes.

    Args:
      mesh_cfg: axis name -> size (``-1`` for "the rest"); missing axes have size 1.
      devices: devices to use (default: all, across processes).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def axis_size(mesh: jax.sharding.Mesh, axes: str | Sequence[str] | None) -> int:
    """Product of the sizes of `axes` in `mesh` (1 for None)."""
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways a global batch is split (``data × fsdp``)."""
    return axis_size(mesh, BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, sequence_axis: int | None = None):
    """`NamedSharding` for a batch array: dim 0 over ``(data, fsdp)``, optionally a time axis
    over ``sequence``."""
    spec: list[Any] = [BATCH_AXES] + [None] * (ndim - 1)
    if sequence_axis is not None and ndim > sequence_axis:
        spec[sequence_axis] = "sequence"
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**10) -> P:
    # big_vision's `fsdp` rule: split the largest dimension divisible by the axis size.
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def _spec_is_valid(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> bool:
    if len(spec) > len(shape):
        return False
    return all(shape[i] % axis_size(mesh, s) == 0 for i, s in enumerate(spec))


def strip_boxes(tree: Any) -> Any:
    """Remove `nn.Partitioned` boxes without applying their sharding constraints (`nn.meta.unbox`
    would call `with_logical_constraint`, which fails on abstract values under a mesh)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def param_shardings(
    abstract_boxed: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
    """`NamedSharding`s for a (possibly `nn.LogicallyPartitioned`-boxed) abstract variable tree.

    Annotated leaves follow `rules`; unannotated leaves get the FSDP default. A rule that would
    not divide a dimension falls back to replication of that leaf rather than failing to compile.
    The result has the *unboxed* tree structure.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    unboxed = strip_boxes(abstract_boxed)
    fsdp = mesh.shape["fsdp"]

    def one(spec, leaf):
        shape = tuple(leaf.shape)
        if spec is None or len(spec) == 0 or all(s is None for s in spec):
            return NamedSharding(mesh, _fsdp_spec(shape, fsdp))
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        if not _spec_is_valid(mesh_spec, shape, mesh):
            return NamedSharding(mesh, _fsdp_spec(shape, fsdp))
        return NamedSharding(mesh, mesh_spec)

    return jax.tree.map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, abstract_params: Any, mesh):
    """Optimizer-state shardings: leaves shaped like a parameter follow that parameter, the rest
    (counters, scalars) are replicated.

    optax states embed parameter-shaped trees (momenta) under arbitrary wrappers, so the match is
    by shape: the first parameter with the same shape donates its sharding.
    """
    by_shape: dict[tuple[int, ...], NamedSharding] = {}
    for p, s in zip(
        jax.tree.leaves(abstract_params), jax.tree.leaves(params_shardings), strict=True
    ):
        by_shape.setdefault(tuple(p.shape), s)

    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) and shape in by_shape:
            return by_shape[shape]
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_opt_state)


# --------------------------------------------------------------------------------------------
# SBP (OneFlow) vocabulary -> jax.sharding
# --------------------------------------------------------------------------------------------


class SBP:
    """One SBP signature component (OneFlow, arXiv:2110.15032): how a tensor lives on one mesh axis.

    * ``split(d)``: dimension ``d`` is cut into equal slices, one per device on the axis
      ↔ `PartitionSpec` with the mesh axis at position ``d``;
    * ``broadcast``: every device holds the full tensor ↔ the axis is absent from the spec
      (replicated);
    * ``partial_sum``: every device holds an addend; the logical tensor is their sum
      ↔ `PartitionSpec(..., unreduced={axis})` in explicit-sharding mode, or a pending all-reduce
      that GSPMD inserts for you in auto mode.
    """

    __slots__ = ("kind", "dim")

    def __init__(self, kind: str, dim: int | None = None):
        if kind not in ("split", "broadcast", "partial_sum"):
            raise ValueError(f"SBP: kind must be split/broadcast/partial_sum, got {kind!r}")
        if (kind == "split") != (dim is not None):
            raise ValueError(f"SBP: split needs a dim and only split takes one, got {kind}({dim})")
        self.kind, self.dim = kind, dim

    def __repr__(self) -> str:
        return f"split({self.dim})" if self.kind == "split" else self.kind

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SBP) and (self.kind, self.dim) == (other.kind, other.dim)

    def __hash__(self) -> int:
        return hash((self.kind, self.dim))


def split(dim: int) -> SBP:
    return SBP("split", dim)


broadcast = SBP("broadcast")
partial_sum = SBP("partial_sum")


def sbp_to_pspec(signature: Mapping[str, SBP], ndim: int) -> tuple[P, frozenset[str]]:
    """Turn an SBP signature ``{mesh_axis: split(d) | broadcast | partial_sum}`` into a
    `PartitionSpec` for an `ndim`-dimensional array plus the set of axes left *partial*.

    Several mesh axes may split the same dimension (their order in `signature` is the major-to-
    minor order of the slices, as in `PartitionSpec(("data", "fsdp"))`). The partial axes are
    returned separately: in `AxisType.Auto` mode JAX keeps them implicit (an all-reduce XLA inserts
    when the value is consumed as replicated); pass them as ``PartitionSpec(..., unreduced=...)``
    under `AxisType.Explicit`.

    Example::

      >>> sbp_to_pspec({"data": split(0), "tensor": split(1)}, 2)
      (PartitionSpec('data', 'tensor'), frozenset())
      >>> sbp_to_pspec({"data": split(0), "tensor": partial_sum}, 2)
      (PartitionSpec('data', None), frozenset({'tensor'}))
    """
    dims: list[list[str]] = [[] for _ in range(ndim)]
    partial: set[str] = set()
    for axis, sbp in signature.items():
        if not isinstance(sbp, SBP):
            raise TypeError(f"sbp_to_pspec: value for axis {axis!r} must be an SBP, got {sbp!r}")
        if sbp.kind == "split":
            if not -ndim <= sbp.dim < ndim:
                raise ValueError(
                    f"sbp_to_pspec: split({sbp.dim}) on axis {axis!r} is out of range for a "
                    f"{ndim}-d array"
                )
            dims[sbp.dim % ndim].append(axis)
        elif sbp.kind == "partial_sum":
            partial.add(axis)
    spec = [None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in dims]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec) if spec else P(), frozenset(partial)


def pspec_to_sbp(spec: P, mesh_axes: Sequence[str]) -> dict[str, SBP]:
    """Inverse of `sbp_to_pspec` for the non-partial part: every mesh axis gets split/broadcast."""
    out = {a: broadcast for a in mesh_axes}
    for d, entry in enumerate(spec):
        if entry is None:
            continue
        for a in (entry,) if isinstance(entry, str) else entry:
            out[a] = split(d)
    return out


def shard_batch(batch: Mapping[str, np.ndarray], mesh, sequence_axis: int | None = None):
    """Place a process-local numpy batch into global arrays sharded over the batch axes.

    Each process passes its own slice of the global batch
    (`jax.make_array_from_process_local_data`); on one process this is a sharded `device_put`.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sh = batch_sharding(mesh, v.ndim, sequence_axis if v.ndim > 1 else None)
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
    return out
