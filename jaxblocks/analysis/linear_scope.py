"""LinearScope — Navarrete Michelini, Liu, Lu, Zhu, "A Tour of Convolutional Networks Guided by
Linear Interpreters", ICCV 2019, https://arxiv.org/abs/1908.05168 (no official code).

LinearScope runs a network on two inputs at once. Every nonlinearity takes its *decision* from
x0 and applies the corresponding *linear action* to x1, so the x1 branch is the affine
"interpreter" of the network at x0:

    y1 = A(x0) x1 + c(x0),        A(x0) x0 + c(x0) = f(x0) = y0.

The paper does this with a two-image batch inside PyTorch layers; here it is a jaxpr
interpreter, so it works on any JAX function (a Linen ``model.apply`` included) without touching
the layers. ``jax.make_jaxpr`` traces ``fn`` and every equation is evaluated on paired values.

Each value is either **decided** (only an x0 value: constants, parameters, comparisons, the
results of singular or piecewise-constant functions) or **linear** (an x0 value v0 and an x1
branch v1 that is affine in x1, with v1 = v0 when x1 = x0). A linear value also carries a
*stamp*: the clock tick of the most recent nonlinearity it came out of. The rules:

* Linear primitives (add, sub, neg, reshape, transpose, broadcast, slice, pad, concatenate,
  gather/scatter, reduce_sum, cumsum, avg-pool windows, convert_element_type, select_n with its
  predicate decided by x0, ...) are applied to both branches; a decided operand enters the x1
  branch as the constant it is (its bias).
* Bilinear primitives (mul, dot_general, conv_general_dilated) with one decided operand apply it
  as the constant factor. With two linear operands, the one with the *later* stamp (the output
  of the more recent nonlinearity: the sigmoid in x·σ(x), the softmax in softmax(qkᵀ)·v, the
  gate in GLU/SwiGLU/SE) is the x0-decided factor: v1 = a0·b1. Equal stamps (q·kᵀ, x·x) are a
  product of peers and split symmetrically: v1 = (a0·b1 + a1·b0)/2, which gives u0·u1 for u².
* div(a, b) always takes the denominator from x0: v1 = a1 / b0 (a decided numerator over a
  linear denominator is decided), so normalisations divide x1 by x0's statistics.
* Piecewise-linear selections (max, min, abs, clamp, reduce_max/min, max-pool
  ``reduce_window_max``, cummax) pick by x0: v1 is their JVP at x0 in the direction x1 (decided
  operands enter with their own value, which is exact by Euler's theorem for these positively
  homogeneous maps). ReLU = max(x, 0) applies x0's mask; leaky ReLU/PReLU are a select_n on x0's
  sign; max-pool gathers x1 at x0's argmax. The output gets a fresh stamp (hard-swish's
  relu6 gate is a gate).
* Smooth elementwise activations f (tanh, logistic, exp, erf/erfc, sin, integer_pow y > 0, ...)
  use the chord through (0, f(0)): v1 = f(u0) + a·(u1 − u0) with a = (f(u0) − f(0)) / u0 (the
  limit f'(u0/2) near u0 = 0). For f(0) = 0 this is the paper's ratio interpreter f(u0)/u0 and
  the bias is zero; otherwise the bias f(0) goes to c(x0). The output gets a fresh stamp.
* Functions singular at 0 (log, sqrt, rsqrt, cbrt, pow, negative integer_pow) and
  piecewise-constant ones (sign, floor, round, comparisons, argmax) return decided values, as
  does ``stop_gradient`` (the programmer marked it a constant).

Normalisation follows from the rules: LayerNorm/GroupNorm/InstanceNorm centre x1 with its *own*
mean (centering is linear) and divide by x0's σ (rsqrt is decided), y1 = γ·(x1 − mean(x1))/σ(x0)
+ β; eval-mode BatchNorm is already affine. Softmax attention applies x0's weights to x1's
values. Deviation from the paper: its InstanceNorm rule subtracts x0's mean, (x1 − μ(x0))/σ(x0);
both satisfy A(x0)x0 + c = f(x0), ours keeps the exact linear part of the centering.

``jit``, ``custom_jvp``/``custom_vjp`` (their primal jaxprs; the custom rules are ignored),
``remat``, ``scan``, ``while`` (x0 decides the trip count) and ``cond`` (x0 picks the branch) are
interpreted recursively. A primitive with a linear operand and no rule raises
`UnsupportedPrimitiveError` naming it (e.g. ``sort``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jaxtyping import Array

__all__ = [
    "UnsupportedPrimitiveError",
    "chord_slope",
    "interpreter",
    "interpreter_matrix",
    "linear_map",
    "linear_scope",
    "transpose",
]

# Applied to both branches; decided float operands enter the x1 branch as constants (their bias).
LINEAR_PRIMITIVES = frozenset(
    {
        "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze",
        "expand_dims", "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad",
        "reduce_sum", "convert_element_type", "copy", "copy_p", "rev", "select_n", "gather",
        "scatter", "scatter-add", "scatter_add", "cumsum", "reduce_window_sum", "reduce_precision",
        "sharding_constraint", "split", "real", "imag", "conj", "complex", "fft",
    }
)  # fmt: skip
BILINEAR_PRIMITIVES = frozenset({"mul", "dot_general", "conv_general_dilated"})
# Positively homogeneous piecewise-linear maps: x0 selects, the JVP applies the selection to x1.
SELECTION_PRIMITIVES = frozenset(
    {"max", "min", "abs", "clamp", "reduce_max", "reduce_min", "reduce_window_max",
     "reduce_window_min", "cummax", "cummin"}
)  # fmt: skip
# Smooth elementwise functions finite at 0: chord interpreter through (0, f(0)).
CHORD_PRIMITIVES = frozenset(
    {"tanh", "logistic", "exp", "exp2", "expm1", "log1p", "erf", "erfc", "erf_inv", "sin", "cos",
     "tan", "atan", "asin", "acos", "sinh", "cosh", "asinh", "atanh", "integer_pow", "square"}
)  # fmt: skip
# Singular at 0 or piecewise constant: the result is decided by x0 alone.
DECIDED_PRIMITIVES = frozenset(
    {"log", "sqrt", "rsqrt", "cbrt", "pow", "sign", "floor", "ceil", "round", "stop_gradient",
     "is_finite", "rem", "nextafter", "atan2"}
)  # fmt: skip
CALL_PRIMITIVES = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
     "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
)  # fmt: skip


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive reached an input-dependent (linear) operand and LinearScope has no rule for
    it (https://arxiv.org/abs/1908.05168). The message names the primitive."""


@dataclasses.dataclass(frozen=True)
class _Val:
    """v0: the x0 value; v1: the x1 branch (None when decided); stamp: last nonlinearity."""

    v0: Any
    v1: Any = None
    stamp: int = 0

    @property
    def linear(self) -> bool:
        return self.v1 is not None


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def chord_slope(f: Callable[[Array], Array], u0: Array, fu0: Array | None = None) -> Array:
    """Slope of the chord of an elementwise ``f`` from 0 to u0 (Navarrete Michelini et al.,
    https://arxiv.org/abs/1908.05168, the interpreter of an activation: f(u0)/u0 when f(0) = 0).

    a = (f(u0) − f(0)) / u0, so that a·u0 + f(0) = f(u0). Near u0 = 0 the difference quotient
    cancels, so there it is replaced by the midpoint derivative f'(u0/2) (the chord's slope to
    second order; the threshold balances the two errors). Computed in fp32 at least.

    Args:
      f: an elementwise function finite at 0.
      u0: its argument.
      fu0: f(u0) if already computed.

    Returns:
      a, same shape and dtype as u0.
    """
    dtype = jnp.result_type(u0)
    work = jnp.promote_types(dtype, jnp.float32)
    u = jnp.asarray(u0).astype(work)
    fu = (f(u0) if fu0 is None else fu0).astype(work)
    f0 = f(jnp.zeros_like(u0)).astype(work)
    tol = float(24.0 * np.finfo(work).eps) ** (1.0 / 3.0)
    big = jnp.abs(u) > tol
    safe = jnp.where(big, u, jnp.ones_like(u))
    half = (u * 0.5).astype(dtype)
    mid = jax.jvp(f, (half,), (jnp.ones_like(half),))[1].astype(work)
    return jnp.where(big, (fu - f0) / safe, mid).astype(dtype)


def _bind(prim, params, args):
    return prim.bind(*args, **prim.get_bind_params(params))


def _listify(out, prim) -> list:
    return list(out) if prim.multiple_results else [out]


class _Interpreter:
    """Evaluates a jaxpr on paired values. ``bias=False`` drops every constant from the x1
    branch, giving the linear part A(x0)·x1 directly (transposable, no subtraction)."""

    def __init__(self, bias: bool):
        self.bias = bias
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- constants in the x1 branch -------------------------------------------------------
    def const_branch(self, v0):
        """The x1 branch of a decided value: itself (affine mode) or zero (linear part)."""
        return v0 if self.bias else jnp.zeros_like(v0)

    def branch(self, v: _Val):
        if v.linear:
            return v.v1
        return self.const_branch(v.v0) if _inexact(v.v0) else v.v0

    def promote(self, v: _Val, stamp: int = 0) -> _Val:
        return v if v.linear else _Val(v.v0, self.const_branch(v.v0), stamp)

    # -- the walk ---------------------------------------------------------------------------
    def run(self, jaxpr, consts: Sequence[_Val], args: Sequence[_Val]) -> list[_Val]:
        env: dict = {}

        def read(var):
            if isinstance(var, jcore.Literal):
                return _Val(var.val)
            return env[var]

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, val in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list[_Val]) -> list[_Val]:
        prim, params, name = eqn.primitive, eqn.params, eqn.primitive.name
        if not any(v.linear for v in ins):
            return [_Val(o) for o in _listify(_bind(prim, params, [v.v0 for v in ins]), prim)]
        if name in CALL_PRIMITIVES:
            return self.call(params, ins)
        if name == "scan":
            return self.scan(params, ins)
        if name == "while":
            return self.while_loop(params, ins)
        if name == "cond":
            return self.cond(params, ins)
        outs0 = _listify(_bind(prim, params, [v.v0 for v in ins]), prim)
        if not any(_inexact(o) for o in outs0):  # comparisons, argmax, casts to int: decisions
            return [_Val(o) for o in outs0]
        stamp = max(v.stamp for v in ins if v.linear)
        if name in LINEAR_PRIMITIVES:
            outs1 = _listify(_bind(prim, params, [self.branch(v) for v in ins]), prim)
            return [_Val(o0, o1, stamp) for o0, o1 in zip(outs0, outs1, strict=True)]
        (y0,) = outs0
        if name in BILINEAR_PRIMITIVES:
            return [_Val(y0, self.bilinear(prim, params, ins), stamp)]
        if name == "div":
            num, den = ins
            if not num.linear:
                return [_Val(y0)]
            return [_Val(y0, _bind(prim, params, [num.v1, den.v0]), stamp)]
        if name in SELECTION_PRIMITIVES:
            return [_Val(y0, self.selection(prim, params, ins), self.tick())]
        if name == "integer_pow" and params["y"] <= 0:
            return [_Val(y0)]
        if name in CHORD_PRIMITIVES:
            (u,) = ins
            a = chord_slope(lambda t: _bind(prim, params, [t]), u.v0, y0)
            y1 = y0 + a * (u.v1 - u.v0) if self.bias else a * u.v1
            return [_Val(y0, y1.astype(y0.dtype), self.tick())]
        if name in DECIDED_PRIMITIVES:
            return [_Val(y0)]
        raise UnsupportedPrimitiveError(
            f"linear_scope: no rule for primitive {name!r} applied to an input-dependent value "
            f"(operand shapes {[np.shape(v.v0) for v in ins]}); see the rules in "
            "jaxblocks.analysis.linear_scope's docstring"
        )

    def bilinear(self, prim, params, ins):
        a, b = ins
        if not a.linear:
            return _bind(prim, params, [a.v0, b.v1])
        if not b.linear:
            return _bind(prim, params, [a.v1, b.v0])
        if a.stamp > b.stamp:  # a is the more recent nonlinearity's output: x0 decides it
            return _bind(prim, params, [a.v0, b.v1])
        if b.stamp > a.stamp:
            return _bind(prim, params, [a.v1, b.v0])
        both = _bind(prim, params, [a.v0, b.v1]) + _bind(prim, params, [a.v1, b.v0])
        return (both * jnp.asarray(0.5, both.dtype)).astype(both.dtype)

    def selection(self, prim, params, ins):
        floats = [i for i, v in enumerate(ins) if _inexact(v.v0)]

        def f(*xs):
            args = [v.v0 for v in ins]
            for i, x in zip(floats, xs, strict=True):
                args[i] = x
            return _bind(prim, params, args)

        primals = [jnp.asarray(ins[i].v0) for i in floats]
        tangents = [
            jnp.asarray(self.branch(ins[i]), p.dtype) for i, p in zip(floats, primals, strict=True)
        ]
        return jax.jvp(f, primals, tangents)[1]

    # -- sub-jaxprs -------------------------------------------------------------------------
    def call(self, params, ins):
        sub = params.get("jaxpr", params.get("call_jaxpr"))
        if isinstance(sub, jcore.ClosedJaxpr):
            return self.run(sub.jaxpr, [_Val(c) for c in sub.consts], ins)
        return self.run(sub, [], ins)

    def closed(self, cj: jcore.ClosedJaxpr, ins):
        return self.run(cj.jaxpr, [_Val(c) for c in cj.consts], ins)

    def pack(self, vals: Sequence[_Val], status: Sequence[bool]) -> list:
        out = []
        for v, lin in zip(vals, status, strict=True):
            out += [v.v0, self.promote(v).v1] if lin else [v.v0]
        return out

    @staticmethod
    def unpack(flat: Sequence, status: Sequence[bool], stamps: Sequence[int]) -> list[_Val]:
        out, i = [], 0
        for lin, s in zip(status, stamps, strict=True):
            out.append(_Val(flat[i], flat[i + 1], s) if lin else _Val(flat[i]))
            i += 2 if lin else 1
        return out

    def fixpoint(self, body: Callable[[list[bool]], list[bool]], status: list[bool]):
        """Carry statuses of a loop: grow the linear set until the body maps it to itself.
        Returns the status of the last call of ``body`` (callers read its side effects)."""
        while True:  # the linear set only grows, so this stops within len(status) + 1 calls
            new = [s or n for s, n in zip(status, body(status), strict=True)]
            if new == status:
                return status
            status = new

    def scan(self, params, ins):
        ft_in = params["ft_in"]
        idx_consts, idx_carry, idx_xs = (list(g) for g in ft_in.update(range(len(ins))).unpack())
        consts = [ins[i] for i in idx_consts]
        init = [ins[i] for i in idx_carry]
        xs = [ins[i] for i in idx_xs]
        body = params["jaxpr"]
        n_carry = len(init)
        carry_stamp = self.tick()
        xs_status = [v.linear for v in xs]
        xs_stamps = [v.stamp for v in xs]
        seen: dict = {}

        def step_fn(status):
            def step(carry, x):
                c = self.unpack(carry, status, [carry_stamp] * n_carry)
                xv = self.unpack(x, xs_status, xs_stamps)
                outs = self.closed(body, consts + c + xv)
                seen["outs"] = outs
                return self.pack(outs[:n_carry], status), [
                    o for v in outs[n_carry:] for o in self.pack([v], [v.linear])
                ]

            return step

        def carry_status(status):
            step_xs = [a[0] for a in self.pack(xs, xs_status)]
            jax.eval_shape(step_fn(status), self.pack(init, status), step_xs)
            return [v.linear for v in seen["outs"][:n_carry]]

        # The fixpoint's last trace used the returned status, so `seen` holds its ys statuses.
        status = self.fixpoint(carry_status, [v.linear for v in init])
        ys_status = [v.linear for v in seen["outs"][n_carry:]]
        carry, ys = lax.scan(
            step_fn(status),
            self.pack(init, status),
            self.pack(xs, xs_status),
            length=params["length"],
            reverse=params["reverse"],
            unroll=params["unroll"],
        )
        stamp = max([v.stamp for v in seen["outs"] if v.linear], default=0)
        return self.unpack(carry, status, [stamp] * n_carry) + self.unpack(
            ys, ys_status, [stamp] * len(ys_status)
        )

    def while_loop(self, params, ins):
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cconsts, bconsts, init = ins[:nc], ins[nc : nc + nb], ins[nc + nb :]
        carry_stamp = self.tick()
        stamps = [carry_stamp] * len(init)
        seen: dict = {}

        def body_fn(status):
            def body(carry):
                outs = self.closed(
                    params["body_jaxpr"], bconsts + self.unpack(carry, status, stamps)
                )
                seen["outs"] = outs
                return self.pack(outs, status)

            return body

        def cond_fn(status):
            def cond(carry):
                (pred,) = self.closed(
                    params["cond_jaxpr"], cconsts + self.unpack(carry, status, stamps)
                )
                return pred.v0

            return cond

        def carry_status(status):
            jax.eval_shape(body_fn(status), self.pack(init, status))
            return [v.linear for v in seen["outs"]]

        status = self.fixpoint(carry_status, [v.linear for v in init])
        out = lax.while_loop(cond_fn(status), body_fn(status), self.pack(init, status))
        stamp = max([v.stamp for v in seen["outs"] if v.linear], default=0)
        return self.unpack(out, status, [stamp] * len(init))

    def cond(self, params, ins):
        index, ops = ins[0], ins[1:]
        if index.linear:  # cannot happen for integer indices; kept for clarity
            raise UnsupportedPrimitiveError("linear_scope: 'cond' index depends on x1")
        branches = params["branches"]
        seen: list = []

        def branch_fn(cj, status):
            def fn(*flat):
                outs = self.closed(cj, self.unpack(flat, [v.linear for v in ops], stamps_in))
                seen.append(outs)
                return self.pack(outs, status) if status is not None else None

            return fn

        stamps_in = [v.stamp for v in ops]
        flat_in = self.pack(ops, [v.linear for v in ops])
        for cj in branches:
            jax.eval_shape(branch_fn(cj, None), *flat_in)
        status = [any(outs[i].linear for outs in seen) for i in range(len(seen[0]))]
        seen.clear()
        out = lax.switch(index.v0, [branch_fn(cj, status) for cj in branches], *flat_in)
        stamp = max([v.stamp for outs in seen for v in outs if v.linear], default=0)
        return self.unpack(out, status, [stamp] * len(status))


# -- public API -----------------------------------------------------------------------------


def _check_pair(x0, x1):
    l0, t0 = jax.tree.flatten(x0)
    l1, t1 = jax.tree.flatten(x1)
    if t0 != t1:
        raise ValueError(f"linear_scope: x1 must have the structure of x0 ({t0}), got {t1}")
    for i, (a, b) in enumerate(zip(l0, l1, strict=True)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"linear_scope: x1 leaf {i} has shape {np.shape(b)}, expected x0's shape "
                f"{np.shape(a)}"
            )
    return l0, l1


def _run(fn, x0, x1, args, kwargs, bias: bool):
    """Trace ``fn(x, *args, **kwargs)`` at x0 and interpret it on (x0, x1)."""
    closed, out_shape = jax.make_jaxpr(lambda x: fn(x, *args, **kwargs), return_shape=True)(x0)
    l0, l1 = _check_pair(x0, x1)
    ins = [
        _Val(a, jnp.asarray(b, jnp.result_type(a)), 0) if _inexact(a) else _Val(a)
        for a, b in zip(l0, l1, strict=True)
    ]
    interp = _Interpreter(bias)
    outs = interp.run(closed.jaxpr, [_Val(c) for c in closed.consts], ins)
    tree = jax.tree.structure(out_shape)
    y0 = [o.v0 for o in outs]
    y1 = [interp.promote(o).v1 if _inexact(o.v0) else o.v0 for o in outs]
    return jax.tree.unflatten(tree, y0), jax.tree.unflatten(tree, y1)


def linear_scope(fn: Callable, x0: Any, x1: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """LinearScope (Navarrete Michelini et al., https://arxiv.org/abs/1908.05168): run ``fn`` on
    x0 and, with every nonlinearity decided by x0, on x1.

    ``fn(x, *args, **kwargs)`` is any JAX function of a pytree of arrays x; for a Linen model
    pass ``functools.partial(model.apply, variables)``. Integer leaves of x are decisions, not
    signals: x0's are used. The rules are in this module's docstring.

    Args:
      fn: the function to interpret.
      x0: the input that takes every decision (masks, argmaxes, gates, statistics).
      x1: the input the x0-decided affine map is applied to; same structure and shapes as x0.
      *args, **kwargs: further arguments of ``fn``, held fixed.

    Returns:
      (y0, y1): y0 = fn(x0) (the same primitives on the same values) and
      y1 = A(x0)·x1 + c(x0), the interpreter applied to x1.

    Example:
      >>> f = lambda x: jax.nn.relu(x - 1.0)
      >>> linear_scope(f, jnp.array([2.0, 0.0]), jnp.array([5.0, 5.0]))[1]
      Array([4., 0.], dtype=float32)
    """
    return _run(fn, x0, x1, args, kwargs, bias=True)


def interpreter(fn: Callable, x0: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """The affine interpreter x1 ↦ A(x0)·x1 + c(x0) of ``fn`` at x0 (Navarrete Michelini et
    al., https://arxiv.org/abs/1908.05168); ``interpreter(fn, x0)(x0) == fn(x0)``.

    Args:
      fn, x0, *args, **kwargs: as in `linear_scope`.

    Returns:
      A function of x1 (same structure as x0) returning y1.

    Example:
      >>> x0 = jnp.array([-1.0, 2.0])
      >>> interpreter(jax.nn.silu, x0)(x0)  # A(x0)·x0 + c(x0) = f(x0)
      Array([-0.26894143,  1.761594  ], dtype=float32)
    """
    return lambda x1: _run(fn, x0, x1, args, kwargs, bias=True)[1]


def linear_map(fn: Callable, x0: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """The linear part x1 ↦ A(x0)·x1 of the interpreter (Navarrete Michelini et al.,
    https://arxiv.org/abs/1908.05168): every bias dropped, equal to y1(x1) − y1(0).

    Computed directly (decided constants enter the x1 branch as zeros), so the result is a
    genuinely linear JAX function: it can be transposed (`transpose`) and vmapped over a basis
    (`interpreter_matrix`). For a piecewise-linear network it equals ``jax.linearize``'s JVP.

    Args:
      fn, x0, *args, **kwargs: as in `linear_scope`.

    Returns:
      A linear function of x1.

    Example:
      >>> linear_map(lambda x: jax.nn.relu(x) + 1.0, jnp.array([-1.0, 2.0]))(jnp.ones(2))
      Array([0., 1.], dtype=float32)
    """
    return lambda x1: _run(fn, x0, x1, args, kwargs, bias=False)[1]


def transpose(fn: Callable, x0: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """The transposed interpreter w ↦ A(x0)ᵀ·w (Navarrete Michelini et al.,
    https://arxiv.org/abs/1908.05168, the paper's "transposed" analysis), by
    ``jax.linear_transpose`` of `linear_map`.

    Args:
      fn, x0, *args, **kwargs: as in `linear_scope`.

    Returns:
      A linear function from output cotangents (structure of fn(x0)) to inputs (of x0).

    Example:
      >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> transpose(lambda x: jax.nn.relu(w @ x), jnp.array([1.0, -1.0]))(jnp.ones(2))  # all off
      Array([0., 0.], dtype=float32)
      >>> transpose(lambda x: jax.nn.relu(w @ x), jnp.array([1.0, 1.0]))(jnp.ones(2))  # wᵀ·1
      Array([4., 6.], dtype=float32)
    """
    lin = linear_map(fn, x0, *args, **kwargs)
    t = jax.linear_transpose(lin, x0)
    return lambda w: t(w)[0]


def interpreter_matrix(
    fn: Callable, x0: Array, *args: Any, max_size: int = 1 << 14, **kwargs: Any
) -> Array:
    """The dense matrix A(x0) of the interpreter (Navarrete Michelini et al.,
    https://arxiv.org/abs/1908.05168), for small inputs: ``A @ x1.ravel() + c`` equals
    ``interpreter(fn, x0)(x1).ravel()`` with c = ``interpreter(fn, x0)(0)``.

    Its rows are the paper's "basis" images of each output and its SVD the interpreter's
    principal directions. Built by vmapping `linear_map` over the standard basis.

    Args:
      fn, x0, *args, **kwargs: as in `linear_scope`; x0 and fn(x0) single arrays.
      max_size: the largest x0.size accepted (the matrix has x0.size columns).

    Returns:
      A of shape ``[fn(x0).size, x0.size]``.
    """
    if not hasattr(x0, "shape") or not _inexact(x0):
        raise ValueError(
            f"interpreter_matrix: x0 must be a floating array, got {type(x0).__name__} "
            f"{getattr(x0, 'dtype', '')}"
        )
    n = int(np.prod(x0.shape))
    if n > max_size:
        raise ValueError(
            f"interpreter_matrix: x0 has shape {tuple(x0.shape)} ({n} entries), expected at most "
            f"max_size={max_size} entries; use linear_map or transpose instead"
        )
    lin = linear_map(fn, x0, *args, **kwargs)
    basis = jnp.eye(n, dtype=x0.dtype).reshape((n, *x0.shape))
    cols = jax.vmap(lin)(basis)
    if not hasattr(cols, "shape"):
        raise ValueError(
            f"interpreter_matrix: fn(x0) must be a single array, got {jax.tree.structure(cols)}"
        )
    return cols.reshape(n, -1).T
