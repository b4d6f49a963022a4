"""Argument checks for the ops' public entry points.

Each check raises `ValueError`/`TypeError` with the op, the argument's name, what it got
(shape, dtype) and what was expected, so bad input never reaches XLA as a trace dump.
Checks look at static shapes and dtypes: they work under `jit`. Values are inspected only by
`check_nonnegative`, and only when they are concrete (outside `jit`); non-finite inputs
otherwise propagate through the ops as IEEE arithmetic says, as each op documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOATING = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def describe(x) -> str:
    return f"shape {tuple(np.shape(x))} dtype {jnp.result_type(x).name}"


def check_array(
    op: str,
    name: str,
    x,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence | None = FLOATING,
    min_size: int | None = None,
) -> None:
    """Check rank, shape (``None`` entries are free), dtype and non-emptiness of ``x``."""
    if x is None:
        raise TypeError(f"{op}: {name} is required, got None")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in ndims:
            want = " or ".join(str(n) for n in ndims)
            raise ValueError(f"{op}: {name} must have rank {want}, got {describe(x)}")
    if shape is not None:
        if len(shape) != x.ndim or any(
            s is not None and s != d for s, d in zip(shape, x.shape, strict=True)
        ):
            want = tuple("?" if s is None else s for s in shape)
            raise ValueError(f"{op}: {name} must have shape {want}, got {describe(x)}")
    if dtypes is not None and jnp.result_type(x) not in [jnp.dtype(d) for d in dtypes]:
        names = [jnp.dtype(d).name for d in dtypes]
        raise TypeError(f"{op}: {name} must have dtype in {names}, got {describe(x)}")
    if min_size is not None and x.size < min_size:
        raise ValueError(f"{op}: {name} must not be empty, got {describe(x)}")


def check_positive(op: str, name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive integer, got {value!r}")


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def check_bool(op: str, name: str, value) -> None:
    """``value`` must be a Python bool or NumPy bool (not a string, number or None)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")


def check_nonnegative(op: str, name: str, x, what: str = "") -> None:
    """When ``x`` holds concrete values (not traced under `jit`), all must be >= 0; the error
    names the first negative entry. NaN passes (it propagates, as documented by each op)."""
    if isinstance(x, jax.core.Tracer):
        return
    a = np.asarray(x)
    bad = np.argwhere(a < 0)
    if bad.size:
        i = tuple(int(v) for v in bad[0])
        raise ValueError(
            f"{op}: {name} must be non-negative{what}, got {a[i].item()!r} at index "
            f"{i if len(i) > 1 else i[0]}"
        )
