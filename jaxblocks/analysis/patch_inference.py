"""Patch-based inference (MCUNetV2): run a CNN's memory-heavy first stage tile by tile.

Lin, Chen, Lin, Gan, Han, "MCUNetV2: Memory-Efficient Patch-based Inference for Tiny Deep
Learning", https://arxiv.org/abs/2110.15352 (code: mit-han-lab/mcunet, tinyengine). The first
stage of an image CNN holds the largest activations; MCUNetV2 computes it on ``n × n`` spatial
tiles, each grown by the stage's receptive-field halo, crops each tile's valid outputs and
stitches them, so only one tile's activations are alive at a time; the rest of the network runs
on the stitched map.

How exactness is kept here (tested equal to full-image inference to 1e-5, strides 1 and 2, odd
sizes): along each spatial axis the stage has a total stride ``S`` and reaches ``left`` input
pixels before and ``right`` after ``S·j`` for output ``j`` (`StageGeometry`). For an output
range ``[o0, o1)`` the input crop starts at ``a = S·⌊max(0, S·o0 − left)/S⌋`` (a multiple of
``S``, so every layer of the crop sees the same sampling grid as the full image) and ends at
``min(W, S·(o1−1) + right + 1)``. The stage runs on the crop with its own padding: at a true
image border the crop's border is the image's (identical zero padding in every layer); at an
interior border the crop's zero padding corrupts only outputs whose receptive field leaves the
crop, and those are outside ``[o0, o1)`` by construction.

`trace_geometry` finds ``S``, ``left`` and ``right`` of a stage of a Linen model by recording
every convolution-like module it calls (anything with ``kernel_size``, ``strides``,
``padding``, e.g. ``nn.Conv`` and `jaxblocks.layers.ConvBN`): ``S`` from the shapes, the reaches
as the sum over all convolutions of their reach times their input's cumulative stride, an upper
bound over every path through branches and shortcuts (a larger halo costs compute, never
exactness). Pooling written as a function (``nn.max_pool``) is invisible to it: pass such a
stage's geometry to `patch_apply` yourself (`conv_geometry` composes layer by layer).

The receptive-field redistribution of the paper (smaller kernels in the patch stage, larger
ones after) is a choice of architecture; `halo_overhead` measures the extra input each tiling
computes, the quantity it reduces.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = [
    "StageGeometry",
    "conv_geometry",
    "halo_overhead",
    "patch_apply",
    "patch_slices",
    "patch_stage",
    "stage_apply",
    "trace_geometry",
]


@dataclasses.dataclass(frozen=True)
class StageGeometry:
    """Per spatial axis (H, W): total stride and receptive-field reach of a stage.

    Output ``j`` of the stage depends on input pixels ``[stride·j − left, stride·j + right]``
    (zero padding included).
    """

    stride: tuple[int, int]
    left: tuple[int, int]
    right: tuple[int, int]

    def __post_init__(self):
        for name in ("stride", "left", "right"):
            v = getattr(self, name)
            if len(v) != 2 or any(int(a) != a for a in v):
                raise ValueError(f"StageGeometry: {name} must be 2 ints (H, W), got {v!r}")
        if min(self.stride) < 1 or min(self.left) < 0 or min(self.right) < 0:
            raise ValueError(
                f"StageGeometry: stride must be >= 1 and reaches >= 0, got stride={self.stride}, "
                f"left={self.left}, right={self.right}"
            )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or 2 ints, got {v!r}")
    return v  # type: ignore[return-value]


def _pads(
    padding: Any, kernel: tuple[int, int], dilation: tuple[int, int], strides: tuple[int, int]
) -> tuple[int, int]:
    """Low-side padding per axis of a Linen-style ``padding`` (SAME / VALID / int / pairs)."""
    eff = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0)
        if padding.upper() == "SAME":
            if max(strides) > 1:  # then XLA's low padding depends on the input's length
                raise ValueError(
                    "patch inference: a strided convolution with padding='SAME' pads by an "
                    "amount that depends on the input size, so tiles would not line up; give "
                    "the layer explicit padding (e.g. ((1, 1), (1, 1)) for a 3x3 kernel)"
                )
            return tuple((e - 1) // 2 for e in eff)  # type: ignore[return-value]
        raise ValueError(f"padding {padding!r} is not supported (SAME, VALID, ints, pairs)")
    if isinstance(padding, int):
        return (padding, padding)
    lows = []
    for p in padding:
        lows.append(p if isinstance(p, int) else p[0])
    return _pair(lows)


def conv_geometry(
    layers: Sequence[tuple[int | Sequence[int], int | Sequence[int], Any]],
) -> StageGeometry:
    """Geometry of a chain of convolutions/pools ``(kernel_size, strides, padding)``, in order.

    Example:
      >>> conv_geometry([(3, 2, 1), (3, 1, 1)])  # 3x3/2 then 3x3/1, both padded by 1
      StageGeometry(stride=(2, 2), left=(3, 3), right=(3, 3))
    """
    stride, left, right = [1, 1], [0, 0], [0, 0]
    for kernel, strides, padding in layers:
        k, s = _pair(kernel), _pair(strides)
        low = _pads(padding, k, (1, 1), s)
        for ax in range(2):
            left[ax] += low[ax] * stride[ax]
            right[ax] += (k[ax] - 1 - low[ax]) * stride[ax]
            stride[ax] *= s[ax]
    return StageGeometry(tuple(stride), tuple(left), tuple(right))  # type: ignore[arg-type]


def _child_call(context, until: str) -> bool:
    """Whether an interceptor context is the top-level model calling its child ``until``."""
    module = context.module
    return (
        context.method_name == "__call__"
        and module.scope is not None
        and tuple(module.scope.path) == (until,)
    )


def stage_apply(model: nn.Module, variables: Any, x: Array, *, until: str, **kwargs: Any) -> Array:
    """The output of the top-level submodule ``until`` of ``model`` applied to ``x``.

    The first stage of the network, as a function: under `jax.jit` everything after ``until``
    is dead code and compiled away. ``kwargs`` go to ``model.apply`` (``train=False``, ...).
    """
    captured = []

    def capture(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if _child_call(context, until):
            captured.append(out)
        return out

    with nn.intercept_methods(capture):
        model.apply(variables, x, **kwargs)
    if not captured:
        raise ValueError(
            f"stage_apply: until={until!r} is not a submodule {type(model).__name__} calls "
            "directly (use the name of one of its top-level children, e.g. 'features_3')"
        )
    return captured[0]


def trace_geometry(
    model: nn.Module,
    variables: Any,
    x: Array,
    *,
    until: str,
    **kwargs: Any,
) -> StageGeometry:
    """`StageGeometry` of the stage of ``model`` that ends with its child ``until``, traced
    (shapes only) from the convolution-like modules it calls; see the module docstring."""
    x = jnp.asarray(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
    records: list[tuple[tuple[int, int], Any]] = []
    done = []

    def record(next_fun, args, kw, context):
        module = context.module
        if (
            not done
            and context.method_name == "__call__"
            and all(hasattr(module, a) for a in ("kernel_size", "strides", "padding"))
            and args
            and hasattr(args[0], "shape")
            and len(args[0].shape) == 4
        ):
            records.append((tuple(args[0].shape[1:3]), module))
        out = next_fun(*args, **kw)
        if _child_call(context, until):
            done.append(out.shape)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)
    if not done:
        raise ValueError(f"trace_geometry: until={until!r} is not a top-level child of "
                         f"{type(model).__name__}")  # fmt: skip
    if not records:
        raise ValueError(f"trace_geometry: no convolution before {until!r}; pass a geometry")
    size_in = tuple(x.shape[1:3])
    size_out = tuple(done[0][1:3])
    stride, left, right = [0, 0], [0, 0], [0, 0]
    for ax in range(2):
        if size_in[ax] % size_out[ax]:
            raise ValueError(
                f"trace_geometry: trace with a spatial size divisible by the stage's stride; "
                f"{size_in} -> {size_out}"
            )
        stride[ax] = size_in[ax] // size_out[ax]
    for shape, module in records:
        k = _pair(module.kernel_size)
        d = _pair(getattr(module, "kernel_dilation", 1) or 1)
        low = _pads(module.padding, k, d, _pair(module.strides))
        for ax in range(2):
            cum = size_in[ax] // shape[ax]  # cumulative stride of this layer's input
            eff = (k[ax] - 1) * d[ax] + 1
            left[ax] += low[ax] * cum
            right[ax] += (eff - 1 - low[ax]) * cum
    return StageGeometry(tuple(stride), tuple(left), tuple(right))  # type: ignore[arg-type]


def patch_slices(
    in_size: int, out_size: int, n: int, stride: int, left: int, right: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per tile along one axis: ((input start, input stop), (output start, output stop))."""
    if not 1 <= n <= out_size:
        raise ValueError(f"patch_slices: {n} patches for {out_size} output pixels")
    bounds = [round(i * out_size / n) for i in range(n + 1)]
    out = []
    for o0, o1 in zip(bounds[:-1], bounds[1:], strict=True):
        a = stride * (max(0, stride * o0 - left) // stride)
        b = min(in_size, stride * (o1 - 1) + right + 1)
        out.append(((a, b), (o0, o1)))
    return out


def halo_overhead(
    in_hw: tuple[int, int], out_hw: tuple[int, int], patches: tuple[int, int], geometry
) -> float:
    """Input pixels the tiles read together / the image's pixels (1.0: no halo overhead)."""
    total = 1.0
    for ax in range(2):
        sl = patch_slices(
            in_hw[ax], out_hw[ax], patches[ax], geometry.stride[ax], geometry.left[ax],
            geometry.right[ax],
        )  # fmt: skip
        total *= sum(b - a for (a, b), _ in sl) / in_hw[ax]
    return total


def patch_apply(
    model: nn.Module,
    variables: Any,
    x: Float[Array, "B H W C"],
    *,
    until: str,
    patches: int | tuple[int, int] = 2,
    geometry: StageGeometry | None = None,
    **kwargs: Any,
) -> Any:
    """``model.apply(variables, x, **kwargs)`` with the stage up to the child ``until``
    computed on ``patches`` tiles per axis (MCUNetV2, https://arxiv.org/abs/2110.15352).

    Same outputs as full-image inference (up to float reassociation); use inference-mode
    kwargs (``train=False``): batch statistics over a tile differ from the image's.

    Args:
      model, variables: a Linen image model whose first stage ends with its top-level child
        ``until`` (e.g. ``"features_3"`` of `MobileNetV2`).
      x: NHWC images.
      patches: tiles per axis (``2`` = 2×2, or ``(nh, nw)``).
      geometry: the stage's `StageGeometry`; default `trace_geometry` on ``x``'s shape rounded
        up to a multiple of 64.
      **kwargs: passed to ``model.apply``.

    Returns:
      What ``model.apply`` returns.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxblocks.registry import create_model
      >>> m = create_model("mobilenet_v2", num_classes=10, width_multiplier=0.25)
      >>> x = jax.random.normal(jax.random.key(0), (1, 40, 40, 3))
      >>> v = m.init(jax.random.key(1), x, train=False)
      >>> y = patch_apply(m, v, x, until="features_3", patches=3, train=False)
      >>> bool(jnp.allclose(y, m.apply(v, x, train=False), atol=1e-5))
      True
    """
    stitched = patch_stage(
        model, variables, x, until=until, patches=patches, geometry=geometry, **kwargs
    )

    def replace(next_fun, args, kw, context):
        if _child_call(context, until):
            return stitched  # the full-image stage above it is dead code under jit
        return next_fun(*args, **kw)

    with nn.intercept_methods(replace):
        return model.apply(variables, x, **kwargs)


def patch_stage(
    model: nn.Module,
    variables: Any,
    x: Float[Array, "B H W C"],
    *,
    until: str,
    patches: int | tuple[int, int] = 2,
    geometry: StageGeometry | None = None,
    **kwargs: Any,
) -> Array:
    """The output of the stage up to ``model``'s child ``until``, computed tile by tile and
    stitched: equal to `stage_apply` on the whole image (arguments as `patch_apply`)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"patch_stage: x must be NHWC [B, H, W, C], got shape "
                         f"{getattr(x, 'shape', None)}")  # fmt: skip
    nh, nw = _pair(patches)
    if geometry is None:
        h, w = (64 * math.ceil(s / 64) for s in x.shape[1:3])
        probe = jax.ShapeDtypeStruct((x.shape[0], h, w, x.shape[3]), x.dtype)
        geometry = trace_geometry(model, variables, probe, until=until, **kwargs)
    stage = _stage_fn(model, until, kwargs)
    out_shape = jax.eval_shape(stage, variables, x).shape
    rows = patch_slices(x.shape[1], out_shape[1], nh, geometry.stride[0], geometry.left[0],
                        geometry.right[0])  # fmt: skip
    cols = patch_slices(x.shape[2], out_shape[2], nw, geometry.stride[1], geometry.left[1],
                        geometry.right[1])  # fmt: skip
    tile_rows = []
    for (a0, a1), (o0, o1) in rows:
        tiles = []
        for (b0, b1), (p0, p1) in cols:
            y = stage(variables, x[:, a0:a1, b0:b1])  # the tile with its halo
            r0, c0 = o0 - a0 // geometry.stride[0], p0 - b0 // geometry.stride[1]
            tiles.append(y[:, r0 : r0 + o1 - o0, c0 : c0 + p1 - p0])  # its valid outputs
        tile_rows.append(jnp.concatenate(tiles, axis=2))
    return jnp.concatenate(tile_rows, axis=1)


def _stage_fn(model: nn.Module, until: str, kwargs: dict) -> Callable[[Any, Array], Array]:
    def stage(variables, x):
        return stage_apply(model, variables, x, until=until, **kwargs)

    return stage
