"""Shared test body for every op: forward and VJP of an implementation vs the fp32 reference.

Error metric (fla's): ``rel_rms(a, b) = rms(a - b) / rms(b)``, with dtype-keyed tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.lowering import check_lowering

# Relative-RMS tolerances by the dtype the implementation computes in. fp32 is loose enough for
# chunked / reassociated sums, bf16 for 8-bit mantissas with fp32 accumulation.
TOLERANCES: dict[Any, float] = {
    jnp.dtype(jnp.float32): 5e-3,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 1e-2,
}


def rel_rms(a, b) -> float:
    """rms(a - b) / rms(b), in float64 on the host; 0 when both are exactly zero."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    num = np.sqrt(np.mean((a - b) ** 2)) if a.size else 0.0
    den = np.sqrt(np.mean(b**2)) if b.size else 0.0
    if den == 0.0:
        return float(num)
    return float(num / den)


def assert_close(actual, expected, *, dtype=jnp.float32, tol: float | None = None, name="out"):
    """Assert every leaf of ``actual`` is within the relative-RMS tolerance of ``expected``."""
    tol = TOLERANCES[jnp.dtype(dtype)] if tol is None else tol
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"{name}: tree mismatch {a_tree} vs {e_tree}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name}[{i}]: non-finite values"
        err = rel_rms(a, e)
        assert err <= tol, f"{name}[{i}]: rel_rms {err:.3e} > tol {tol:.1e}"


def leaves_changed(new, old):
    """A tree of bools: whether each leaf of ``new`` differs anywhere from its twin in ``old``.
    Compared in numpy: eager ``jnp`` compiled one comparison per distinct leaf shape (~1 s for a
    model's BatchNorm statistics)."""
    return jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new, old)


def random_cotangent(out, seed: int = 1):
    """A random (never zero) cotangent with the structure and dtypes of ``out``."""
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    cts = [
        jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(tree, cts)


def check_forward_and_vjp(
    fn: Callable[..., Any],
    ref_fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    dtype=jnp.float32,
    tol: float | None = None,
    grad_tol: float | None = None,
    argnums: Sequence[int] | None = None,
) -> None:
    """Compare ``fn`` with ``ref_fn`` (the fp32 reference) in the forward and the VJP.

    The reference runs on the arguments promoted to fp32; the VJP of both is taken at one random
    cotangent, for every argument in ``argnums`` (default: all floating arguments).
    """
    args = list(args)
    if argnums is None:
        argnums = [
            i
            for i, a in enumerate(args)
            if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        ]
    to32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    args32 = [to32(a) if hasattr(a, "dtype") else a for a in args]

    def partial(f, full):
        def g(*diff):
            full_ = list(full)
            for i, d in zip(argnums, diff, strict=True):
                full_[i] = d
            return f(*full_)

        return g

    out, vjp = jax.vjp(partial(fn, args), *[args[i] for i in argnums])
    ref, ref_vjp = jax.vjp(partial(ref_fn, args32), *[args32[i] for i in argnums])
    assert_close(out, ref, dtype=dtype, tol=tol, name="forward")
    ct = random_cotangent(ref)
    ct_lo = jax.tree.map(lambda c, o: c.astype(o.dtype), ct, out)
    grads = vjp(ct_lo)
    ref_grads = ref_vjp(ct)
    for i, g, rg in zip(argnums, grads, ref_grads, strict=True):
        assert_close(
            g, rg, dtype=dtype, tol=grad_tol if grad_tol is not None else tol, name=f"grad[arg {i}]"
        )


def check_custom_vjp_matches_autodiff(
    fn: Callable[..., Any], ref_fn: Callable[..., Any], args: Sequence[Any], *, tol: float = 1e-4
) -> None:
    """The custom_vjp of ``fn`` against autodiff of ``ref_fn``, via a scalar loss, in fp32."""
    argnums = tuple(range(len(args)))

    def loss(f):
        def scalar(*a):
            out = f(*a)
            leaves = jax.tree.leaves(out)
            cts = jax.tree.leaves(random_cotangent(out, seed=7))
            return sum(
                jnp.vdot(x.astype(jnp.float32), c.astype(jnp.float32))
                for x, c in zip(leaves, cts, strict=True)
            )

        return scalar

    g = jax.grad(loss(fn), argnums=argnums)(*args)
    rg = jax.grad(loss(ref_fn), argnums=argnums)(*args)
    assert_close(g, rg, tol=tol, name="custom_vjp vs autodiff")


def check_pallas_lowering(
    loss_fn: Callable[..., Any], args: Sequence[Any], platform: str, *, op: str, min_kernels=2
) -> str:
    """Lower ``value_and_grad(loss_fn)`` w.r.t. all args for ``platform``; require the kernels."""
    f = jax.value_and_grad(loss_fn, argnums=tuple(range(len(args))))
    return check_lowering(f, args, platform, op=op, min_kernels=min_kernels)
