"""Per-program resource budgets of the Pallas kernels, checked without hardware.

Each Pallas kernel's ``_common.py`` has a ``working_set(...)`` function that estimates what one
program (one grid step) holds from its block sizes and shapes, as a `GpuWorkingSet` (registers
per thread at the launch's ``num_warps``, shared memory over the pipeline stages) or a
`TpuWorkingSet` (VMEM per grid step, double-buffered blocks plus scratch). Its ``supports``
predicate rejects shapes whose estimate exceeds the target's limits, and the tests assert that
the default block sizes fit `H100` and `TPU_V5E` at the op's documented shapes.

The estimates are deliberately simple and conservative:

* Triton spreads each block tensor over the program's ``32 * num_warps`` threads, one 32-bit
  register per fp32 (or two bf16) elements; `GpuWorkingSet.registers_per_thread` sums the
  blocks that are live at the same time, plus `REGISTER_OVERHEAD` for addresses, loop indices
  and masks. Past `GpuLimits.registers_per_thread` the kernel spills to local memory (slow) or
  fails to compile.
* Shared memory holds the operands of every ``dot`` and the pipelined loads, once per stage.
* Mosaic double-buffers every blocked input and output (``buffering=2``) and keeps scratch
  buffers once; the sum must fit the scoped VMEM limit.

A figure from the hardware check (`jaxblocks.kernels.check_hardware`) overrides any estimate:
the estimate only keeps us from shipping a launch that cannot fit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "GpuLimits",
    "TpuLimits",
    "H100",
    "TPU_V5E",
    "REGISTER_OVERHEAD",
    "GpuWorkingSet",
    "TpuWorkingSet",
    "nbytes",
]

# Registers a Triton program spends besides its block tensors (pointers, offsets, masks, loop
# counters); a rough figure from the register reports of fla's and FlashRNN's kernels.
REGISTER_OVERHEAD = 32


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """What one streaming multiprocessor gives one program."""

    name: str
    shared_memory_bytes: int
    registers_per_thread: int
    threads_per_warp: int = 32
    register_file: int = 64 * 1024


@dataclasses.dataclass(frozen=True)
class TpuLimits:
    """What one TensorCore gives one Mosaic grid step."""

    name: str
    vmem_bytes: int


# H100 and H200 share the SM: 228 KB shared memory per SM (227 KB usable by one block),
# 255 registers per thread at most, 64K 32-bit registers per SM for all of a block's threads.
H100 = GpuLimits("H100/H200 SM", shared_memory_bytes=227 * 1024, registers_per_thread=255)
# TPU v5e: 16 MiB of scoped VMEM by default (the smallest of v4/v5e/v5p/v6e defaults).
TPU_V5E = TpuLimits("TPU v5e core", vmem_bytes=16 * 1024 * 1024)


def nbytes(shape: tuple[int, ...], dtype: object) -> int:
    """Bytes of one block of ``shape`` and ``dtype``."""
    return math.prod(shape) * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class GpuWorkingSet:
    """One Triton program's estimated footprint.

    Attributes:
      kernel: the kernel's name (as its ``pallas_call`` ``name=``).
      live_bytes: bytes of the block tensors live at the same time in registers.
      num_warps: the launch's warps per program.
      shared_memory_bytes: dot operands and pipelined loads over all stages.
    """

    kernel: str
    live_bytes: int
    num_warps: int
    shared_memory_bytes: int = 0

    @property
    def registers_per_thread(self) -> int:
        threads = H100.threads_per_warp * self.num_warps
        return math.ceil(self.live_bytes / 4 / threads) + REGISTER_OVERHEAD

    def check(self, limits: GpuLimits = H100) -> str | None:
        """None when the program fits ``limits``, else the reason (naming the kernel)."""
        regs = self.registers_per_thread
        if regs > limits.registers_per_thread:
            return (
                f"{self.kernel}: ~{regs} registers per thread at num_warps={self.num_warps} "
                f"exceed the {limits.registers_per_thread} of an {limits.name}"
            )
        threads = limits.threads_per_warp * self.num_warps
        if regs * threads > limits.register_file:
            return (
                f"{self.kernel}: ~{regs} registers per thread x {threads} threads exceed the "
                f"{limits.register_file} registers of an {limits.name}"
            )
        if self.shared_memory_bytes > limits.shared_memory_bytes:
            return (
                f"{self.kernel}: ~{self.shared_memory_bytes // 1024} KB of shared memory exceed "
                f"the {limits.shared_memory_bytes // 1024} KB of an {limits.name}"
            )
        return None


@dataclasses.dataclass(frozen=True)
class TpuWorkingSet:
    """One Mosaic grid step's estimated VMEM.

    Attributes:
      kernel: the kernel's name.
      block_bytes: the blocked inputs and outputs of one grid step (each once).
      scratch_bytes: scratch buffers (``scratch_shapes``), held once.
      buffering: copies of each block the pipeline keeps (2: double-buffered).
    """

    kernel: str
    block_bytes: int
    scratch_bytes: int = 0
    buffering: int = 2

    @property
    def vmem_bytes(self) -> int:
        return self.buffering * self.block_bytes + self.scratch_bytes

    def check(self, limits: TpuLimits = TPU_V5E) -> str | None:
        """None when the grid step fits ``limits``, else the reason (naming the kernel)."""
        if self.vmem_bytes > limits.vmem_bytes:
            return (
                f"{self.kernel}: ~{self.vmem_bytes / 2**20:.1f} MiB of VMEM per grid step "
                f"exceed the {limits.vmem_bytes / 2**20:.0f} MiB of a {limits.name}"
            )
        return None
