"""Multi-Scale VMamba's blocks: the official multi-scale SS2D (MS2D), ConvFFN and the VSS block.

Shi, Dong, Xu, "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model", NeurIPS
2024, https://arxiv.org/abs/2405.14174. Official code: YuHengsss/MSVMamba
``classification/models/vmamba.py`` (``SS2D`` with ``sscore_type="multiscale_4scan_12"``,
``ms_split=[1, 3]``; ``VSSBlock`` with ``convFFN=True``, ``mlp_ratio=0``, ``add_se=True``) and
``classification/models/utils.py`` (``ConvFFN``, ``SEModule``, ``x_selective_scan``).

`MultiScaleSS2D` follows the official layout and semantics exactly: ``K = 1 + ms_split[0] = 2``
parameter sets, set 0 for the half-resolution branch and set 1 for the full-resolution one, and
the three half-resolution directions (row-major reversed, column-major, column-major reversed)
concatenated along the sequence into ONE scan of length ``3·h·w`` that shares set 0 and carries
its state across the joins. (`jaxblocks.layers.ssm.MS2D` instead keeps four parameter sets and
scans the three directions separately; it is a different layer.) Parameter names and layouts
are the official ones (``x_proj_weight [K, R+2N, D]``, ``dt_projs_weight [K, D, R]``,
``dt_projs_bias [K, D]``, ``A_logs [K·D, N]``, ``Ds [K·D]``), so a state dict maps by name
(`jaxblocks.models.msvmamba.convert_official`).

Initialisation follows the official code: Linear layers (in/out projections, SE) draw from
``normal(0.02)`` — timm's ``trunc_normal_(std=.02)`` truncates at ±2 *absolute*, i.e. not at all
at this std — with zero biases; convolutions (the depthwise 3×3 / 7×7 of the scan and the ConvFFN's
1×1 / 3×3) keep torch's default ``U(±1/√fan_in)`` for weights and biases; ``x_proj`` is torch's
default Linear ``U(±1/√D)`` (it is never re-initialised), ``dt_projs`` Mamba's (``U(±R^-½)``
weights, softplus⁻¹ of a log-uniform Δ in [1e-3, 0.1] as bias), ``A_logs = log(1..N)``, ``Ds = 1``.
Channels last throughout; LayerNorm ε 1e-5 (torch's default, which ``norm_layer="ln"`` selects).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.ssm import (
    COL,
    COL_REV,
    ROW_REV,
    SS2D,
    a_log_init,
    cross_scan,
    dt_bias_init,
    ss2d_scan,
)
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "LOW_RES_DIRECTIONS",
    "ConvFFN",
    "MSVMambaBlock",
    "MultiScaleSS2D",
    "torch_default_init",
    "upsample_bilinear",
]

# The half-resolution branch's scan orders, in the order they are concatenated along L.
LOW_RES_DIRECTIONS = (ROW_REV, COL, COL_REV)
LINEAR_INIT = nn.initializers.normal(0.02)  # timm trunc_normal_(std=.02): bounds ±2 absolute


def torch_default_init(fan_in: int):
    """(kernel_init, bias_init) of torch's default Conv2d / Linear: ``U(±1/√fan_in)`` both."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init, init


def _bilinear_matrix(n_in: int, n_out: int) -> Array:
    """``[n_out, n_in]`` weights of torch's 1-D linear interpolation, ``align_corners=False``.

    Source coordinate ``(i + ½)·n_in/n_out − ½`` clamped below at 0 (torch's rule), then the two
    neighbours weighted linearly; the upper neighbour is clamped to the last sample.
    """
    scale = n_in / n_out
    src = jnp.maximum((jnp.arange(n_out, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    hi = jnp.minimum(lo + 1, n_in - 1)
    w_hi = src - lo
    eye = jnp.eye(n_in, dtype=jnp.float32)
    return eye[lo] * (1.0 - w_hi)[:, None] + eye[hi] * w_hi[:, None]


def upsample_bilinear(x: Float[Array, "B h w C"], H: int, W: int) -> Float[Array, "B H W C"]:
    """MSVMamba's (https://arxiv.org/abs/2405.14174) upsampling: torch's bilinear, NHWC.

    ``F.interpolate(x, (H, W), mode="bilinear", align_corners=False)`` with fp32 weights.

    Written as two small interpolation matrices so it matches torch for any ratio (MSVMamba
    upsamples ``ceil(H/2) → H``, not an exact 2× when H is odd).
    """
    mh = _bilinear_matrix(x.shape[1], H)
    mw = _bilinear_matrix(x.shape[2], W)
    y = jnp.einsum("Hh,bhwc->bHwc", mh, x.astype(jnp.float32))  # [B, H, w, C]
    return jnp.einsum("Ww,bHwc->bHWc", mw, y).astype(x.dtype)  # [B, H, W, C]


def _unflatten(seq: Array, direction: int, h: int, w: int) -> Array:
    """``[B, L, D]`` in scan order ``direction`` -> ``[B, h, w, D]``."""
    B, _, D = seq.shape
    if direction in (ROW_REV, COL_REV):
        seq = seq[:, ::-1]
    if direction in (COL, COL_REV):
        return jnp.swapaxes(seq.reshape(B, w, h, D), 1, 2)
    return seq.reshape(B, h, w, D)


class _SE(nn.Module):
    """MSVMamba's ``SEModule``: mean → Linear(C→C/r, no bias) → ReLU → Linear(→C) → sigmoid."""

    reduction: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        C = x.shape[-1]
        dense = lambda f, n, axes: nn.Dense(
            f,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(LINEAR_INIT, axes),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=n,
        )
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # [B, C]
        s = nn.relu(dense(max(1, C // self.reduction), "fc1", ("mlp", None))(s))
        s = jax.nn.sigmoid(dense(C, "fc2", (None, "mlp"))(s))
        return x * s[:, None, None, :].astype(x.dtype)


class MultiScaleSS2D(nn.Module):
    """Multi-Scale VMamba's MS2D, the official layout (Shi et al., https://arxiv.org/abs/2405.14174).

    ``in_proj C → 2D`` split into x, z (``z ← SiLU(z)``). Full-resolution branch: x → DW 3×3
    → SiLU → one row-major scan with parameter set 1. Half-resolution branch: x → DW 7×7
    stride 2 (padding 3) → SiLU → the row-major-reversed, column-major and column-major-reversed
    sequences concatenated along L → ONE scan of length ``3·h·w`` with parameter set 0 (the
    state runs on across the joins, as the official code scans the concatenation). Each branch's
    output goes through the shared ``out_norm`` LayerNorm per token; the three low-resolution
    pieces are mapped back to ``[h, w]``, summed and bilinearly upsampled (``align_corners=False``)
    and added to the full-resolution map. Then SE (reduction 8, when ``se_reduction``),
    ``· SiLU(z)`` and ``out_proj D → C``. ``D = ssm_ratio·C``, dt rank ``ceil(C/16)``.

    Each scan is Mamba's selective scan (`jaxblocks.kernels.selective_scan.selective_scan`, via
    `jaxblocks.layers.ssm.ss2d_scan` with one group) with ``Δ = softplus(dt_proj(x_proj(x)) +
    bias)``, ``A = −exp(A_logs)`` and the ``Ds`` skip of its set.

    Attributes:
      d_state: N (1 in every MSVMamba model). ssm_ratio: ``D / C``. dt_rank: "auto" = ceil(C/16).
      d_conv: full-resolution depthwise kernel (3). low_res_kernel: the stride-2 one (7).
      se_reduction: SE bottleneck ratio (8); None: no SE (``add_se=False``).
      conv_bias: biases of the depthwise convs (True). norm_eps: out_norm ε (1e-5).
      implementation: the selective-scan kernel (None: automatic). dtype, param_dtype.

    Example:
      >>> op = MultiScaleSS2D(d_state=1)
      >>> y, params = op.init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    """

    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    low_res_kernel: int = 7
    se_reduction: int | None = 8
    conv_bias: bool = True
    norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dwconv(self, features: int, k: int, stride: int, name: str) -> nn.Conv:
        kernel_init, bias_init = torch_default_init(k * k)
        return nn.Conv(
            features,
            (k, k),
            strides=stride,
            padding=(k - 1) // 2,
            feature_group_count=features,
            use_bias=self.conv_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _scan(self, seq: Array, params: tuple[Array, ...], k: int, D: int) -> Array:
        """``[B, D, L]`` through parameter set ``k`` (one selective scan)."""
        x_proj, dt_w, dt_b, A_logs, Ds = params
        ys = ss2d_scan(
            seq[:, None],  # [B, 1, D, L]
            x_proj[k : k + 1],
            dt_w[k : k + 1],
            dt_b[k : k + 1],
            A_logs[k * D : (k + 1) * D],
            Ds[k * D : (k + 1) * D],
            implementation=self.implementation,
        )
        return jnp.swapaxes(ys[:, 0], 1, 2)  # [B, L, D]

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        if not hasattr(x, "ndim") or x.ndim != 4 or min(x.shape) < 1:
            raise ValueError(
                f"MultiScaleSS2D: x must be NHWC [B, H, W, C] with every dim >= 1, got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"MultiScaleSS2D: x must be floating point, got dtype {x.dtype}")
        if self.d_state < 1 or self.ssm_ratio <= 0:
            raise ValueError(
                f"MultiScaleSS2D: d_state must be >= 1 and ssm_ratio > 0, got d_state="
                f"{self.d_state!r}, ssm_ratio={self.ssm_ratio!r}"
            )
        B, H, W, C = x.shape
        D = int(self.ssm_ratio * C)
        R = math.ceil(C / 16) if self.dt_rank == "auto" else int(self.dt_rank)
        N, K = self.d_state, 2  # K = 1 + ms_split[0]: set 0 low-res, set 1 full-res
        xz = nn.Dense(
            2 * D,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(LINEAR_INIT, ("embed", "mlp")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="in_proj",
        )(x.astype(self.dtype))
        x, z = jnp.split(xz, 2, axis=-1)
        z = nn.silu(z)
        x0 = nn.silu(self._dwconv(D, self.d_conv, 1, "conv2d")(x))  # [B, H, W, D]
        x1 = nn.silu(self._dwconv(D, self.low_res_kernel, 2, "conv2d_b1")(x))  # [B, h, w, D]
        h, w = x1.shape[1:3]

        def p(name, init, shape, axes):
            return self.param(
                name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
            )

        params = (
            p("x_proj_weight", torch_default_init(D)[0], (K, R + 2 * N, D), (None, None, "mlp")),
            p("dt_projs_weight", torch_default_init(R)[0], (K, D, R), (None, "mlp", None)),
            p("dt_projs_bias", dt_bias_init(), (K, D), (None, "mlp")),
            p("A_logs", a_log_init, (K * D, N), ("mlp", None)),
            p("Ds", nn.initializers.ones, (K * D,), ("mlp",)),
        )
        out_norm = nn.LayerNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="out_norm"
        )
        # half resolution: three orders concatenated along L, one scan with set 0
        seq1 = cross_scan(x1, LOW_RES_DIRECTIONS)  # [B, 3, D, h·w]
        seq1 = jnp.moveaxis(seq1, 1, 2).reshape(B, D, 3 * h * w)  # [B, D, 3·h·w]
        y1 = out_norm(self._scan(seq1, params, 0, D))  # [B, 3·h·w, D]
        pieces = jnp.split(y1, 3, axis=1)
        y1 = sum(_unflatten(s, d, h, w) for s, d in zip(pieces, LOW_RES_DIRECTIONS, strict=True))
        # full resolution: row-major, set 1
        seq0 = jnp.moveaxis(x0.reshape(B, H * W, D), 1, 2)  # [B, D, H·W]
        y0 = out_norm(self._scan(seq0, params, 1, D)).reshape(B, H, W, D)
        y = y0 + upsample_bilinear(y1, H, W).astype(y0.dtype)
        if self.se_reduction:
            y = _SE(self.se_reduction, self.dtype, self.param_dtype, name="se")(y)
        y = y * z
        return nn.Dense(
            C,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(LINEAR_INIT, ("mlp", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out_proj",
        )(y)


class ConvFFN(nn.Module):
    """MSVMamba's ConvFFN (Shi et al., https://arxiv.org/abs/2405.14174), ``utils.ConvFFN``.

    1×1 ``C → e·C`` → ``x + DW3×3(x)`` → GELU → 1×1 ``→ C``.
    It replaces the MLP to add local mixing next to the scan. GELU is the exact (erf) form, as
    torch's default; dropout after each 1×1 (``FFN_DROPOUT``, 0 in the released configs). The
    1×1 convolutions are Dense layers (``linear1``, ``linear2``) with torch's default init.

    Attributes:
      expansion: hidden width / C (2). dropout: rate after each projection. dtype, param_dtype.
    """

    expansion: int = 2
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False):
        C = x.shape[-1]
        hidden = C * self.expansion

        def dense(f, fan_in, name):
            k_init, b_init = torch_default_init(fan_in)
            return nn.Dense(
                f,
                kernel_init=k_init,
                bias_init=b_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        x = dense(hidden, C, "linear1")(x.astype(self.dtype))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        k_init, b_init = torch_default_init(9)
        x = x + nn.Conv(
            hidden,
            (3, 3),
            padding=1,
            feature_group_count=hidden,
            kernel_init=k_init,
            bias_init=b_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dwc",
        )(x)
        x = nn.gelu(x, approximate=False)
        x = dense(C, hidden, "linear2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class MSVMambaBlock(nn.Module):
    """Multi-Scale VMamba's VSS block (Shi et al., https://arxiv.org/abs/2405.14174).

    ``x + DropPath(MS2D(LN(x)))`` then ``x + DropPath(ConvFFN(LN(x)))``: a VMamba block whose
    SS2D scans three of its four directions at half resolution (`MultiScaleSS2D`, the official
    ``multiscale_4scan_12`` layout) and whose MLP is a convolutional FFN. ``multiscale=False``
    gives the plain four-direction SS2D (VMamba v2, `jaxblocks.layers.ssm.SS2D`) block with
    ConvFFN, which MSVMamba uses in stages left out of ``ms_stage`` (none in the released models).

    Attributes:
      d_state, ssm_ratio, dt_rank, d_conv: the scan (see `MultiScaleSS2D`).
      se_reduction: SE in MS2D (8; None: none). multiscale: MS2D (True) or SS2D.
      ffn_expansion, ffn_dropout: the ConvFFN. drop_path: stochastic depth rate.
      norm_eps: LayerNorm epsilon (torch's 1e-5, the VSSM default). implementation: scan kernel.
      dtype, param_dtype.

    Example:
      >>> block = MSVMambaBlock.nano()
      >>> y, params = block.init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 48)))
    """

    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    se_reduction: int | None = 8
    multiscale: bool = True
    ffn_expansion: int = 2
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def nano(cls, **overrides) -> MSVMambaBlock:
        """MSVMamba-Nano's block (``vssm_nano_224_ms``: d_state 1, ssm_ratio 2, ConvFFN ×2, SE /8).

        Nano stacks these at widths 48/96/192/384 with depths [1, 2, 5, 2] and drop-path up to
        0.2 (`jaxblocks.models.msvmamba.MSVMamba`).
        """
        base = dict(d_state=1, ssm_ratio=2.0, ffn_expansion=2, se_reduction=8, multiscale=True)
        return cls(**{**base, **overrides})

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False):
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(
                f"MSVMambaBlock: x must be NHWC [B, H, W, C], got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        norm = lambda n: nn.LayerNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=n
        )
        common = dict(
            d_state=self.d_state,
            ssm_ratio=self.ssm_ratio,
            dt_rank=self.dt_rank,
            d_conv=self.d_conv,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.multiscale:
            op = MultiScaleSS2D(se_reduction=self.se_reduction, name="op", **common)
        else:
            op = SS2D(name="op", **common)
        x = x.astype(self.dtype)
        x = x + drop_path(self, op(norm("norm")(x)), self.drop_path, not train)
        ffn = ConvFFN(
            self.ffn_expansion, self.ffn_dropout, self.dtype, self.param_dtype, name="ffn"
        )
        return x + drop_path(self, ffn(norm("norm2")(x), train=train), self.drop_path, not train)
