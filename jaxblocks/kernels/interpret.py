"""The interpret switch: run Pallas kernels on CPU.

Inside ``with jaxblocks.kernels.interpret():`` GPU (Triton-backend) kernels are built with
``interpret=True`` and TPU (Mosaic) kernels with ``interpret=pltpu.InterpretParams()`` (the TPU
interpreter, which simulates VMEM/SMEM and the sequential grid). Kernels read the switch through
`gpu_interpret()` / `tpu_interpret()` when they are traced, so call (or re-trace) the op inside
the block; a function already jitted outside the block keeps the mode it was traced with.

(`pltpu.force_tpu_interpret_mode()` is not used: in jax 0.11.2 it also captures Triton-backend
kernels and fails on their compiler params.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from jax.experimental.pallas import tpu as pltpu

_state = threading.local()


def interpret_enabled() -> bool:
    """True inside `interpret()`."""
    return getattr(_state, "depth", 0) > 0


def gpu_interpret() -> bool:
    """The ``interpret=`` argument for a GPU (Triton-backend) ``pallas_call``."""
    return interpret_enabled()


def tpu_interpret() -> pltpu.InterpretParams | bool:
    """The ``interpret=`` argument for a TPU (Mosaic) ``pallas_call``."""
    return pltpu.InterpretParams() if interpret_enabled() else False


@contextlib.contextmanager
def interpret() -> Iterator[None]:
    """Run every Pallas kernel traced in this block with the Pallas interpreters (CPU)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
