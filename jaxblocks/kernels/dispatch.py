"""One dispatch rule for every op.

``implementation=None`` picks the fastest implementation that supports the current platform and
the given shapes, in the order ``pallas_gpu`` (GPU), ``pallas_tpu`` (TPU), ``xla``, ``reference``.
A Pallas kernel is picked automatically only where the hardware record
(``hardware_validation.json`` beside this file, written by the hardware check) holds a passing
entry for this op, implementation, device kind and jax version whose measured forward+backward
was at least as fast as ``xla`` in every checked case (``faster_than_xla``); elsewhere the op runs
``xla`` and says why once per op and device in a log message (logger ``jaxblocks.kernels``). A
kernel that is correct on the device but slower stays available by name.

An explicit choice is honoured where it can run: on its own platform, under `interpret()` (the
Pallas interpreters on CPU) and inside `cross_platform_export` (how the kernels are lowered for
``cuda`` and ``tpu`` from a CPU machine; `jaxblocks.kernels.lowering` enters it). Its shape
constraints are always checked, and an unknown, unsupported or unrunnable name raises
`UnsupportedImplementationError` naming the op and what is available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from jaxblocks.kernels.interpret import interpret_enabled

logger = logging.getLogger("jaxblocks.kernels")

HARDWARE_RECORD = pathlib.Path(__file__).with_name("hardware_validation.json")

IMPLEMENTATIONS: tuple[str, ...] = ("pallas_gpu", "pallas_tpu", "xla", "reference")

# Platforms on which each implementation runs compiled. Under `interpret()` the Pallas ones run
# on CPU too, but only when asked for by name: the interpreter is a test tool, never a default.
_NATIVE_PLATFORMS: dict[str, tuple[str, ...]] = {
    "pallas_gpu": ("gpu", "cuda", "rocm"),
    "pallas_tpu": ("tpu",),
    "xla": ("cpu", "gpu", "cuda", "rocm", "tpu"),
    "reference": ("cpu", "gpu", "cuda", "rocm", "tpu"),
}


class UnsupportedImplementationError(ValueError):
    """An implementation was asked for that does not exist or cannot take these inputs."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of an op.

    Attributes:
      fn: the function, called with the op's validated arguments.
      supports: optional predicate over the same arguments returning ``None`` when the
        implementation can take them, else a short reason (e.g. "K=60 is not a multiple of 8").
    """

    fn: Callable[..., Any]
    supports: Callable[..., str | None] | None = None

    def reason_unsupported(self, *args: Any, **kwargs: Any) -> str | None:
        return None if self.supports is None else self.supports(*args, **kwargs)


def current_platform() -> str:
    return jax.default_backend()


def current_device_kind() -> str:
    return jax.devices()[0].device_kind


_export_state = threading.local()


@contextlib.contextmanager
def cross_platform_export(platform: str) -> Iterator[None]:
    """Allow explicit Pallas implementations while exporting for ``platform`` from this machine.

    ``jax.export(..., platforms=["cuda"])`` traces on the local (e.g. CPU) backend; inside this
    block an explicit ``implementation="pallas_gpu"`` is lowered instead of being refused as
    unrunnable here. `jaxblocks.kernels.lowering.export_mlir` enters it for you.
    """
    if platform not in ("cuda", "rocm", "gpu", "tpu"):
        raise ValueError(
            f"cross_platform_export: platform must be cuda/rocm/gpu/tpu, got {platform!r}"
        )
    previous = getattr(_export_state, "platform", None)
    _export_state.platform = platform
    try:
        yield
    finally:
        _export_state.platform = previous


def exporting_for() -> str | None:
    """The platform of the innermost `cross_platform_export` block, or None."""
    return getattr(_export_state, "platform", None)


@functools.cache
def _load_record(path: str) -> tuple[dict[str, Any], ...]:
    p = pathlib.Path(path)
    if not p.exists():
        return ()
    entries = json.loads(p.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: the hardware record must be a JSON list of objects")
    return tuple(entries)


def hardware_record(path: pathlib.Path | str | None = None) -> tuple[dict[str, Any], ...]:
    """The hardware validation entries (op, implementation, device_kind, jax, date, result)."""
    return _load_record(str(path or HARDWARE_RECORD))


def _passing_entry(op: str, implementation: str, device_kind: str) -> dict[str, Any] | None:
    """The record's passing entry for ``op``/``implementation`` on this device kind with the
    running jax version, if any."""
    for e in hardware_record():
        if (
            e.get("op") == op
            and e.get("implementation") == implementation
            and e.get("device_kind") == device_kind
            and e.get("jax") == jax.__version__
            and e.get("result") == "pass"
        ):
            return e
    return None


def validated_on_hardware(op: str, implementation: str, device_kind: str) -> bool:
    """True when the record holds a passing check of ``op``/``implementation`` on this device
    kind with the running jax version."""
    return _passing_entry(op, implementation, device_kind) is not None


def why_not_default(op: str, implementation: str, device_kind: str) -> str | None:
    """Why ``implementation=None`` does not pick this Pallas kernel here (``None``: it does).

    It needs a passing record entry for this device kind and jax version that also says
    ``faster_than_xla`` (the hardware check's forward+backward at least as fast as ``xla``).
    """
    entry = _passing_entry(op, implementation, device_kind)
    if entry is None:
        return (
            f"not validated on {device_kind!r} with jax {jax.__version__} (no passing entry "
            f"in {HARDWARE_RECORD.name})"
        )
    if entry.get("faster_than_xla") is True:
        return None
    return (
        f"correct on {device_kind!r} but slower than xla in the hardware check "
        f"(forward+backward speed-ups {dict(entry.get('speedup_fwd_bwd') or {})})"
    )


_fallbacks_logged: set[tuple[str, str, str]] = set()


def _log_fallback_once(op: str, name: str, device_kind: str, reason: str) -> None:
    key = (op, name, device_kind)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        logger.warning(
            "%s: %s is %s; using the next implementation. Pass implementation=%r to use it anyway.",
            op,
            name,
            reason,
            name,
        )


def _runnable_here(op: str, implementation: str, available: list[str]) -> None:
    """Refuse an explicit Pallas implementation that cannot run or lower here."""
    platform = current_platform()
    if (
        implementation not in ("pallas_gpu", "pallas_tpu")
        or platform in _NATIVE_PLATFORMS[implementation]
    ):
        return
    if interpret_enabled() or exporting_for() is not None:
        return
    kind = "GPU (Triton)" if implementation == "pallas_gpu" else "TPU (Mosaic)"
    raise UnsupportedImplementationError(
        f"{op}: implementation={implementation!r} is a Pallas {kind} kernel and cannot run on "
        f"platform {platform!r}. Run it in the Pallas interpreter with "
        f"`with jaxblocks.kernels.interpret(): ...`, export it for its platform with "
        f"`jaxblocks.kernels.lowering.export_mlir` (or inside "
        f"`jaxblocks.kernels.cross_platform_export(...)`), or pick one of {available} or None "
        f"(automatic)"
    )


def select_implementation(
    op: str,
    implementation: str | None,
    impls: Mapping[str, Implementation],
    *args: Any,
    **kwargs: Any,
) -> tuple[str, Callable[..., Any]]:
    """Return ``(name, fn)`` of the implementation to run for ``op`` on these arguments.

    Args:
      op: the op's public name, used in error messages.
      implementation: ``None`` or one of `IMPLEMENTATIONS` present in ``impls``.
      impls: the op's implementations by name.
      *args, **kwargs: the op's arguments, passed to each candidate's ``supports`` predicate.

    Raises:
      UnsupportedImplementationError: unknown name, or the named implementation cannot take
        these inputs; the message lists the available implementations and the reason.
    """
    available = [name for name in IMPLEMENTATIONS if name in impls]
    if implementation is not None and not isinstance(implementation, str):
        raise TypeError(
            f"{op}: implementation must be None or a str (one of {available}), got "
            f"{type(implementation).__name__} {implementation!r}"
        )
    if implementation is not None:
        if implementation not in impls:
            raise UnsupportedImplementationError(
                f"{op}: implementation={implementation!r} is not known; "
                f"available: {available} or None (automatic)"
            )
        reason = impls[implementation].reason_unsupported(*args, **kwargs)
        if reason is not None:
            raise UnsupportedImplementationError(
                f"{op}: implementation={implementation!r} does not support these inputs: "
                f"{reason}; available: {available} or None (automatic)"
            )
        _runnable_here(op, implementation, available)
        return implementation, impls[implementation].fn

    platform = current_platform()
    reasons = []
    for name in available:
        if platform not in _NATIVE_PLATFORMS[name]:
            continue
        reason = impls[name].reason_unsupported(*args, **kwargs)
        if reason is None and name.startswith("pallas_"):
            device_kind = current_device_kind()
            reason = why_not_default(op, name, device_kind)
            if reason is not None:
                _log_fallback_once(op, name, device_kind, reason)
        if reason is None:
            return name, impls[name].fn
        reasons.append(f"{name}: {reason}")
    raise UnsupportedImplementationError(
        f"{op}: no implementation supports these inputs on platform {platform!r} "
        f"(interpret mode: {interpret_enabled()}); tried {reasons}"
    )
