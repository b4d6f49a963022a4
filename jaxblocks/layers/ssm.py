"""2-D selective-scan layers: VMamba's SS2D and its scan helpers (Multi-Scale VMamba's official
MS2D, with its two parameter sets and one concatenated low-resolution scan, is
`jaxblocks.blocks.msvmamba.MultiScaleSS2D`).

`cross_scan` flattens a ``[B, H, W, C]`` map into the four VMamba scan orders (row-major,
column-major and both reversed) and `cross_merge` maps scan outputs back and sums them (it is
`cross_scan`'s transpose). `ss2d_scan` runs Mamba's selective scan over K directions in one
grouped `selective_scan` call (``B, C: [B, K, N, L]``), with VMamba's x/dt projections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.kernels.selective_scan.api import selective_scan

# VMamba's scan orders, in CrossScan's order: 0 row-major, 1 column-major, 2 and 3 reversed.
ROW, COL, ROW_REV, COL_REV = 0, 1, 2, 3
ALL_DIRECTIONS = (ROW, COL, ROW_REV, COL_REV)


def _flatten(x: Array, direction: int) -> Array:
    """``[B, H, W, C]`` -> ``[B, C, H·W]`` in scan order ``direction``."""
    B, H, W, C = x.shape
    if direction in (COL, COL_REV):
        x = jnp.swapaxes(x, 1, 2)  # column-major: W outer, H inner
    seq = jnp.moveaxis(x.reshape(B, H * W, C), 1, 2)
    return seq[..., ::-1] if direction in (ROW_REV, COL_REV) else seq


def _unflatten(y: Array, direction: int, H: int, W: int) -> Array:
    """``[B, C, H·W]`` in scan order ``direction`` -> ``[B, H, W, C]``."""
    B, C, _ = y.shape
    if direction in (ROW_REV, COL_REV):
        y = y[..., ::-1]
    y = jnp.moveaxis(y, 1, 2)
    if direction in (COL, COL_REV):
        return jnp.swapaxes(y.reshape(B, W, H, C), 1, 2)
    return y.reshape(B, H, W, C)


def cross_scan(
    x: Float[Array, "B H W C"], directions: Sequence[int] = ALL_DIRECTIONS
) -> Float[Array, "B K C L"]:
    """VMamba's cross-scan (arXiv 2401.10166): the map as K = len(directions) sequences.

    ``directions`` picks from 0 row-major, 1 column-major, 2 row-major reversed, 3 column-major
    reversed (VMamba's CrossScan uses all four, in this order).
    """
    return jnp.stack([_flatten(x, d) for d in directions], axis=1)


def cross_merge(
    ys: Float[Array, "B K C L"], H: int, W: int, directions: Sequence[int] = ALL_DIRECTIONS
) -> Float[Array, "B H W C"]:
    """VMamba's cross-merge: each direction's sequence back to ``[B, H, W, C]``, summed.

    It is the transpose of `cross_scan`; ``cross_merge(cross_scan(x)) = K·x``.
    """
    if ys.shape[1] != len(directions) or ys.shape[-1] != H * W:
        raise ValueError(
            f"cross_merge: ys [B, K, C, L] must have K={len(directions)} and L=H·W={H * W}, "
            f"got shape {ys.shape}"
        )
    return sum(_unflatten(ys[:, k], d, H, W) for k, d in enumerate(directions))


def ss2d_scan(
    xs: Float[Array, "B K D L"],
    x_proj_weight: Float[Array, "K R2N D"],
    dt_projs_weight: Float[Array, "K D R"],
    dt_projs_bias: Float[Array, "K D"],
    A_logs: Float[Array, "KD N"],
    Ds: Float[Array, " KD"],
    *,
    implementation: str | None = None,
) -> Float[Array, "B K D L"]:
    """VMamba's multi-direction selective scan: one grouped `selective_scan` over K sequences.

    Per direction k: ``(dt_r, B, C) = x_proj_weight[k] · x`` (dt rank R, state N),
    ``Δ = dt_projs_weight[k] · dt_r``, then ``selective_scan(x, Δ, -exp(A_logs), B, C, Ds,
    delta_bias=dt_projs_bias, delta_softplus=True)`` with k's ``A``, ``D`` and bias rows.
    """
    B, K, D, L = xs.shape
    R = dt_projs_weight.shape[-1]
    N = A_logs.shape[-1]
    x_dbl = jnp.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.astype(xs.dtype))  # [B, K, R+2N, L]
    dts, Bs, Cs = jnp.split(x_dbl, [R, R + N], axis=2)
    dts = jnp.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.astype(xs.dtype))  # [B, K, D, L]
    ys = selective_scan(
        xs.reshape(B, K * D, L),
        dts.reshape(B, K * D, L),
        -jnp.exp(A_logs.astype(jnp.float32)),
        Bs,
        Cs,
        Ds.astype(jnp.float32),
        delta_bias=dt_projs_bias.reshape(-1).astype(jnp.float32),
        delta_softplus=True,
        implementation=implementation,
    )
    return ys.reshape(B, K, D, L)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
    """Mamba's Δ bias: softplus⁻¹ of Δ drawn log-uniformly in [dt_min, dt_max], floored."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: ``A_log[d, n] = log(n + 1)``, so ``A = -(1, 2, ..., N)`` per channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape).astype(
        dtype
    )


class _ScanParams(nn.Module):
    """The per-direction parameters of VMamba's scans (x_proj, dt_projs, A_logs, Ds)."""

    K: int
    d_inner: int
    d_state: int
    dt_rank: int
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        K, D, N, R = self.K, self.d_inner, self.d_state, self.dt_rank
        uniform = lambda s: lambda k, shape, dt=jnp.float32: jax.random.uniform(k, shape, dt, -s, s)
        p = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        return (
            p("x_proj_weight", uniform(D**-0.5), (K, R + 2 * N, D), (None, None, "mlp")),
            p("dt_projs_weight", uniform(self.dt_scale * R**-0.5), (K, D, R), (None, "mlp", None)),
            p(
                "dt_projs_bias",
                dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                (K, D),
                (None, "mlp"),
            ),
            p("A_logs", a_log_init, (K * D, N), ("mlp", None)),
            p("Ds", nn.initializers.ones, (K * D,), ("mlp",)),
        )


class _SS2DBase(nn.Module):
    d_state: int = 16
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dims(self, C):
        d_inner = int(self.ssm_ratio * C)
        R = math.ceil(C / 16) if self.dt_rank == "auto" else int(self.dt_rank)
        return d_inner, R

    def _dense(self, features, name, axes):
        return nn.Dense(
            features,
            use_bias=self.bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), axes),
            name=name,
        )

    def _dwconv(self, features, k, stride, name):
        return nn.Conv(
            features,
            (k, k),
            strides=stride,
            padding=(k - 1) // 2,
            feature_group_count=features,
            use_bias=self.conv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name="out_norm"):
        return nn.LayerNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def _check(self, x):
        name = type(self).__name__
        if not hasattr(x, "ndim") or x.ndim != 4 or min(x.shape[1:]) < 1:
            raise ValueError(
                f"{name}: x must be NHWC [B, H, W, C] with H, W, C >= 1, got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )

    def _in(self, x):
        C = x.shape[-1]
        d_inner, R = self._dims(C)
        xz = self._dense(2 * d_inner, "in_proj", ("embed", "mlp"))(x.astype(self.dtype))
        x, z = jnp.split(xz, 2, axis=-1)
        return x, nn.silu(z), d_inner, R


class SS2D(_SS2DBase):
    """VMamba's 2-D selective scan, SS2D (Liu et al., https://arxiv.org/abs/2401.10166).

    Mamba's selective scan over a ``[B, H, W, C]`` map along four orders (row/column-major, each
    both ways) with separate parameters per order, merged by summation: every token sees the
    whole map. VMamba v2 form: in_proj ``C → 2·d_inner`` split into x, z; x → depthwise
    ``d_conv × d_conv`` → SiLU → 4 directional scans (one grouped `selective_scan`) → merge →
    LayerNorm → ``· SiLU(z)`` → out_proj.

    Attributes:
      d_state: N; ssm_ratio: ``d_inner = ssm_ratio · C``; dt_rank: "auto" = ``ceil(C / 16)``.
      d_conv: depthwise kernel; conv_bias, bias (projections), norm_eps (out LayerNorm).
      directions: the scan orders (see `cross_scan`). implementation: the scan kernel.
      dtype: compute dtype; param_dtype: storage dtype.

    Example:
      >>> y, params = SS2D(d_state=4).init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    """

    directions: tuple[int, ...] = ALL_DIRECTIONS

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        self._check(x)
        B, H, W, C = x.shape
        x, z, d_inner, R = self._in(x)
        x = nn.silu(self._dwconv(d_inner, self.d_conv, 1, "conv2d")(x))
        params = _ScanParams(
            len(self.directions), d_inner, self.d_state, R, param_dtype=self.param_dtype
        )()
        ys = ss2d_scan(cross_scan(x, self.directions), *params, implementation=self.implementation)
        y = cross_merge(ys, H, W, self.directions)
        y = self._norm()(y) * z
        return self._dense(C, "out_proj", ("mlp", "embed"))(y)
