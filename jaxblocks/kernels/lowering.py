"""Export an op for ``cuda`` and ``tpu`` from any machine and check the Pallas kernel is there.

There is no GPU in CI, so the cuda export runs against an abstract H100 (an `AbstractMesh`
with an `AbstractDevice`), and the Triton custom call is allowed past export's safety check.
Lower ``jax.value_and_grad`` of an op so that the forward and the backward kernels are both
lowered.
"""

from __future__ import annotations

import contextlib
import re
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


_TRITON_IR = re.compile(r'ir = "((?:[^"\\]|\\.)*)"')
# Triton prints ``inputPrecision`` only when it is not its default, IEEE.
_DOT = re.compile(r"tt\.dot .*")
_INPUT_PRECISION = re.compile(r"inputPrecision = (\w+)")


def _unescape_mlir_string(s: str) -> bytes:
    """The bytes of an MLIR string attribute as printed (``\\XX`` hex escapes)."""
    out = bytearray()
    i = 0
    while i < len(s):
        if s[i] == "\\":
            nxt = s[i + 1]
            simple = {"\\": 92, '"': 34, "n": 10, "t": 9}
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
            else:
                out.append(int(s[i + 1 : i + 3], 16))
                i += 3
        else:
            out += s[i].encode()
            i += 1
    return bytes(out)


def triton_modules(mlir_text: str) -> list[str]:
    """The Triton IR (text) of every Pallas GPU kernel in an exported ``cuda`` module.

    The Triton custom call carries its kernel as MLIR bytecode in its backend config; it is
    parsed with jaxlib's Triton dialect and printed, so tests can read what Triton compiles
    (e.g. the ``inputPrecision`` of every ``tt.dot``).
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    texts = []
    for m in _TRITON_IR.finditer(mlir_text):
        ctx = ir.Context()
        ctx.allow_unregistered_dialects = True  # e.g. `gpu.barrier` from pltriton.debug_barrier
        tt_dialect.register_dialect(ctx)
        with ctx:
            texts.append(str(ir.Module.parse(_unescape_mlir_string(m.group(1)))))
    return texts


def triton_dot_precisions(mlir_text: str) -> list[str]:
    """``inputPrecision`` of every ``tt.dot`` in the module's Triton kernels ("ieee", "tf32")."""
    found = []
    for text in triton_modules(mlir_text):
        for line in _DOT.findall(text):
            m = _INPUT_PRECISION.search(line)
            found.append(m.group(1) if m else "ieee")
    return found
