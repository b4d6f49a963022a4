"""One dispatch rule for every op.

``implementation=None`` picks the fastest implementation that supports the current platform and
the given shapes, in the order ``pallas_gpu`` (GPU), ``pallas_tpu`` (TPU), ``xla``, ``reference``.
An explicit choice is honoured on any platform (that is how kernels are lowered for ``cuda`` and
``tpu`` from a CPU machine, and how they run under `interpret()`), but its shape constraints are
still checked, and an unknown or unsupported name raises an error listing what is available.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxblocks.kernels.interpret import interpret_enabled

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
        return implementation, impls[implementation].fn

    platform = current_platform()
    reasons = []
    for name in available:
        if platform not in _NATIVE_PLATFORMS[name]:
            continue
        reason = impls[name].reason_unsupported(*args, **kwargs)
        if reason is None:
            return name, impls[name].fn
        reasons.append(f"{name}: {reason}")
    raise UnsupportedImplementationError(
        f"{op}: no implementation supports these inputs on platform {platform!r} "
        f"(interpret mode: {interpret_enabled()}); tried {reasons}"
    )
