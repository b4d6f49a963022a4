"""Multi-Scale VMamba's block: MS2D token mixing + ConvFFN channel mixing.

Shi, Dong, Xu, "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model", NeurIPS
2024, https://arxiv.org/abs/2405.14174 (code: YuHengsss/MSVMamba, ``VSSBlock`` with
``sscore_type=multiscale_4scan_12``, ``convFFN=True``, ``mlp_ratio=0``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.ssm import MS2D, SS2D
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = ["ConvFFN", "MSVMambaBlock"]


class ConvFFN(nn.Module):
    """MSVMamba's ConvFFN: 1×1 ``C → e·C`` → ``x + DW3×3(x)`` → GELU → 1×1 ``→ C``.

    It replaces the MLP to add local channel mixing next to the scan. GELU is the exact (erf)
    form, as torch's default; dropout after each projection (MSVMamba's VSSBlock default is 0.2).
    """

    expansion: int = 2
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False):
        C = x.shape[-1]
        hidden = C * self.expansion
        dense = lambda f, n: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=n)
        x = dense(hidden, "linear1")(x.astype(self.dtype))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x + nn.Conv(
            hidden,
            (3, 3),
            padding=1,
            feature_group_count=hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dwc",
        )(x)
        x = nn.gelu(x, approximate=False)
        x = dense(C, "linear2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class MSVMambaBlock(nn.Module):
    """Multi-Scale VMamba block (Shi et al., https://arxiv.org/abs/2405.14174).

    ``x + DropPath(MS2D(LN(x)))`` then ``x + DropPath(ConvFFN(LN(x)))``: a VMamba block whose
    SS2D scans three of its four directions at half resolution (`MS2D`) and whose MLP is a
    convolutional FFN. ``multiscale=False`` gives the plain SS2D (VMamba v2) block with ConvFFN.

    Attributes:
      d_state, ssm_ratio, dt_rank, d_conv: the scan (see `MS2D`); se_reduction: SE in MS2D.
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
        0.2; pass ``drop_path`` and (for training as the paper) ``ffn_dropout`` per block.
        """
        base = dict(d_state=1, ssm_ratio=2.0, ffn_expansion=2, se_reduction=8, multiscale=True)
        return cls(**{**base, **overrides})

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False):
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
            op = MS2D(se_reduction=self.se_reduction, name="op", **common)
        else:
            op = SS2D(name="op", **common)
        x = x.astype(self.dtype)
        x = x + drop_path(self, op(norm("norm")(x)), self.drop_path, not train)
        ffn = ConvFFN(
            self.ffn_expansion, self.ffn_dropout, self.dtype, self.param_dtype, name="ffn"
        )
        return x + drop_path(self, ffn(norm("norm2")(x), train=train), self.drop_path, not train)
