"""`selective_scan`: Mamba's selective state-space scan (Mamba, arXiv 2312.00752), official layout.

`selective_scan` validates its arguments and dispatches to ``reference`` (token loop, fp32),
``xla`` (chunked, the CPU default), ``pallas_gpu`` (Triton kernels: a loop over L inside the
kernel with the ``[dim_tile, N]`` state in registers) or ``pallas_tpu`` (Mosaic kernels: L chunks
as the innermost sequential grid axis, the state in VMEM). ``block_sizes`` (a `BlockSizes`, one
object for both kernels) is passed through to the Pallas implementations.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.selective_scan import pallas_gpu, pallas_tpu
from jaxblocks.kernels.selective_scan._common import BlockSizes, default_block_sizes
from jaxblocks.kernels.selective_scan.reference import selective_scan_reference
from jaxblocks.kernels.selective_scan.xla import selective_scan_xla
from jaxblocks.kernels.validation import check_array, check_bool

OP = "selective_scan"


def _ignoring_block_sizes(fn):
    """``fn`` called as the Pallas implementations are, ``block_sizes`` dropped."""

    def run(*args, block_sizes, precision):
        del block_sizes
        return fn(*args, precision=precision)

    return run


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_ignoring_block_sizes(selective_scan_reference)),
    "xla": Implementation(_ignoring_block_sizes(selective_scan_xla)),
    "pallas_gpu": Implementation(
        pallas_gpu.selective_scan_pallas_gpu, supports=pallas_gpu.supports
    ),
    "pallas_tpu": Implementation(
        pallas_tpu.selective_scan_pallas_tpu, supports=pallas_tpu.supports
    ),
}


def _validate(u, delta, A, B, C, D, z, delta_bias, block_sizes):
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{OP}: block_sizes must be None or a jaxblocks.kernels.selective_scan.BlockSizes, "
            f"got {type(block_sizes).__name__} {block_sizes!r}"
        )
    check_array(OP, "u", u, ndim=3)
    batch, dim, L = u.shape
    if batch == 0 or dim == 0:
        raise ValueError(f"{OP}: u [batch, dim, L] must have batch, dim > 0, got {u.shape}")
    check_array(OP, "delta", delta, shape=(batch, dim, L))
    check_array(OP, "A", A, ndim=2)
    if A.shape[0] != dim or A.shape[1] == 0:
        raise ValueError(
            f"{OP}: A must have shape (dim={dim}, N > 0) (real A only), got shape {A.shape}"
        )
    N = A.shape[1]
    check_array(OP, "B", B, ndim=(3, 4))
    if B.ndim == 3:
        check_array(OP, "B", B, shape=(batch, N, L))
    else:
        G = B.shape[1]
        if G == 0 or dim % G:
            raise ValueError(
                f"{OP}: grouped B [batch, G, N, L] needs G > 0 dividing dim={dim}, got {B.shape}"
            )
        check_array(OP, "B", B, shape=(batch, G, N, L))
    if C is None or not hasattr(C, "shape") or tuple(C.shape) != tuple(B.shape):
        check_array(OP, "C", C)  # None / not an array -> its own error first
        raise ValueError(
            f"{OP}: C must have the shape of B {tuple(B.shape)} ([batch, N, L] or "
            f"[batch, G, N, L]), got shape {tuple(C.shape)}"
        )
    check_array(OP, "C", C)
    if D is not None:
        check_array(OP, "D", D, shape=(dim,))
    if z is not None:
        check_array(OP, "z", z, shape=(batch, dim, L))
    if delta_bias is not None:
        check_array(OP, "delta_bias", delta_bias, shape=(dim,))


def selective_scan(
    u: Float[Array, "batch dim L"],
    delta: Float[Array, "batch dim L"],
    A: Float[Array, "dim N"],
    B: Float[Array, "batch N L"] | Float[Array, "batch G N L"],
    C: Float[Array, "batch N L"] | Float[Array, "batch G N L"],
    D: Float[Array, " dim"] | None = None,
    z: Float[Array, "batch dim L"] | None = None,
    delta_bias: Float[Array, " dim"] | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    precision: str = "highest",
):
    """Mamba's selective scan (arXiv 2312.00752), the S6 layer's core, with Mamba's own API.

    Runs ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t h_t + D u_t``, optionally
    ``y_t · silu(z_t)``, per channel of ``dim`` with an ``N``-dim diagonal state (see
    `reference.selective_scan_reference`). Unlike a linear-attention scan the decay is input
    dependent per channel *and* state, so the ``[dim, N]`` state is never materialised over L in
    the fast implementations. Grouped ``B, C [batch, G, N, L]`` serve VMamba's 4-direction scans
    in one call. Accumulation is fp32 everywhere.

    Args:
      u: inputs ``[batch, dim, L]``.
      delta: step sizes Δ ``[batch, dim, L]`` (before ``delta_bias``/softplus).
      A: state matrix (diagonal per channel) ``[dim, N]``, real (usually ``-exp(A_log)``).
      B, C: input and output projections ``[batch, N, L]`` or grouped ``[batch, G, N, L]``.
      D: skip ``[dim]``. z: gate ``[batch, dim, L]``. delta_bias: ``[dim]`` added to Δ.
      delta_softplus: apply softplus to ``Δ + delta_bias``.
      return_last_state: also return the final state ``[batch, dim, N]`` (fp32).
      implementation: None (automatic), "reference", "xla", "pallas_gpu" or "pallas_tpu".
      block_sizes: tile sizes of the Pallas kernels (`BlockSizes`: ``gpu_*`` fields and the
        Triton launch parameters for ``pallas_gpu``, ``tpu_*`` fields for ``pallas_tpu``);
        None gives `default_block_sizes`. ``reference`` and ``xla`` ignore it. Sizes whose
        estimated registers / VMEM per program (`_common.working_set`) exceed an H100 SM or a
        TPU v5e core make the kernel unsupported (the reason names the kernel).
      precision: "highest" (default) or "tf32" (`jaxblocks.kernels.precision`). The Pallas
        kernels are elementwise (no matrix products: the readout ``C_t h_t`` is a sum over N
        in fp32), so it changes nothing there; ``xla`` passes it to its readout einsum.

    Returns:
      ``out [batch, dim, L]`` in ``u.dtype``, and ``last_state`` if asked. L = 0 gives an empty
      ``out`` and a zero state.

    Example:
      >>> import jax.numpy as jnp
      >>> u = jnp.ones((2, 8, 5)); A = -jnp.ones((8, 4)); B = jnp.ones((2, 4, 5))
      >>> selective_scan(u, u, A, B, B).shape
      (2, 8, 5)
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, block_sizes)
    check_bool(OP, "delta_softplus", delta_softplus)
    check_bool(OP, "return_last_state", return_last_state)
    prec = resolve_precision(OP, precision)
    block_sizes = default_block_sizes() if block_sizes is None else block_sizes
    batch, dim, L = u.shape
    if L == 0:  # no token: an empty output, the initial (zero) state
        out = jnp.zeros((batch, dim, 0), u.dtype)
        last = jnp.zeros((batch, dim, A.shape[1]), jnp.float32)
        return (out, last) if return_last_state else out
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kwargs = dict(block_sizes=block_sizes, precision=prec)
    _, fn = select_implementation(OP, implementation, IMPLEMENTATIONS, *args, **kwargs)
    out, last = fn(*args, **kwargs)
    return (out, last) if return_last_state else out
