"""Export an op for ``cuda`` and ``tpu`` from any machine and check the Pallas kernel is there.

There is no GPU in CI, so the cuda export runs against an abstract H100 (an `AbstractMesh`
with an `AbstractDevice`), and the Triton custom call is allowed past export's safety check.
Lower ``jax.value_and_grad`` of an op so that the forward and the backward kernels are both
lowered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import export
from jax.sharding import AxisType

from jaxblocks.kernels.dispatch import cross_platform_export

# What a Pallas kernel becomes in the exported StableHLO, per platform.
PALLAS_CUSTOM_CALL: dict[str, str] = {
    "cuda": "__gpu$xla.gpu.triton",  # Pallas Triton backend
    "tpu": "tpu_custom_call",  # Mosaic TPU
}

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
)


class LoweringError(RuntimeError):
    """Export for a platform failed or did not contain the expected kernel."""


def _describe(args: Sequence[Any]) -> str:
    leaves = jax.tree.leaves(args)
    return ", ".join(f"{tuple(x.shape)}:{x.dtype}" for x in leaves if hasattr(x, "shape"))


def export_mlir(fn: Callable[..., Any], args: Sequence[Any], platform: str) -> str:
    """StableHLO text of ``jax.jit(fn)(*args)`` exported for ``platform`` ("cuda" or "tpu")."""
    ctx = contextlib.nullcontext()
    if platform == "cuda":
        mesh = jax.sharding.AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=H100)
        ctx = jax.sharding.use_abstract_mesh(mesh)
    with ctx, cross_platform_export(platform):
        exp = export.export(
            jax.jit(fn),
            platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(PALLAS_CUSTOM_CALL["cuda"])],
        )(*args)
    return exp.mlir_module()


def check_lowering(
    fn: Callable[..., Any],
    args: Sequence[Any],
    platform: str,
    *,
    op: str,
    min_kernels: int = 1,
) -> str:
    """Export ``fn`` for ``platform`` and require at least ``min_kernels`` Pallas custom calls.

    Returns the module text. Raises `LoweringError` naming the op, platform and argument shapes.
    """
    if platform not in PALLAS_CUSTOM_CALL:
        raise ValueError(f"check_lowering: platform must be one of {list(PALLAS_CUSTOM_CALL)}")
    try:
        text = export_mlir(fn, args, platform)
    except Exception as e:  # re-raised with the op and shapes: the trace alone rarely says
        raise LoweringError(
            f"{op}: lowering for {platform} failed for arguments [{_describe(args)}]: "
            f"{type(e).__name__}: {e}"
        ) from e
    found = text.count(PALLAS_CUSTOM_CALL[platform])
    if found < min_kernels:
        raise LoweringError(
            f"{op}: lowering for {platform} holds {found} Pallas kernel(s) "
            f"({PALLAS_CUSTOM_CALL[platform]!r}), expected at least {min_kernels}, "
            f"for arguments [{_describe(args)}]"
        )
    return text
