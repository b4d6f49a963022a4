"""SLAB transformer block: simplified linear attention + progressive re-parameterized BN.

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.attention import SimplifiedLinearAttention
from jaxblocks.layers.norm import PRepBN, fold_repbn_into_dense
from jaxblocks.typing import Array, Float

__all__ = ["SLABBlock", "fold_slab_block"]

Dtype = Any


class SLABBlock(nn.Module):
    """SLAB-DeiT block — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    A pre-norm ViT block whose token mixer is `SimplifiedLinearAttention` and whose norms are
    `PRepBN` (LayerNorm during early training, decaying to the foldable RepBN):
    ``x = x + SLA(norm1(x)); x = x + MLP(norm2(x))`` with MLP = Dense(r·C) → GELU (exact) →
    Dense(C). SLAB-DeiT-T uses C = 192, 3 heads, MLP ratio 4, depth 12, PRepBN over 60k steps,
    14×14 tokens (patch 16, no class token, average-pooled head).

    For deployment, `fold_slab_block` folds each norm's inference RepBN into the Dense after it
    (qkv and fc1); the folded variables run in ``deploy=True`` mode, which has no norms at all.

    ``norm`` is a factory for a module called as ``norm(x, use_running_average=..., step=...)``
    (`PRepBN` with its schedule; ``step`` is passed only when given); the block builds it as
    ``norm(dtype=..., param_dtype=..., ln_epsilon=..., name=...)``.

    LayerNorm ε (``ln_epsilon``): the official code (xinghaochen/SLAB ``classification/models``)
    uses 1e-6 for the DeiT variant (``slab_deit.py``: ``partial(nn.LayerNorm, eps=1e-6)`` in
    ``deit_*_patch16_224_linear_repbn``) — our default — and PyTorch's default 1e-5 for the Swin
    variant (``slab_swin.py``: ``ln = nn.LayerNorm``); pass ``ln_epsilon=1e-5`` for SLAB-Swin.
    ``ln_epsilon=None`` leaves the norm factory's own ε (`PRepBN`'s default is 1e-5). RepBN's
    BatchNorm ε is 1e-5 in both (``nn.BatchNorm1d``). Official code also differs in dropout /
    drop-path (omitted here); its BN momentum 0.1 is Flax decay 0.9, our `PRepBN` default.

    Attributes:
      num_heads: attention heads.
      mlp_ratio: MLP hidden size / C.
      qkv_bias: bias in the qkv projection (SLAB-DeiT: True).
      kernel_size: SLA's depth-wise conv kernel.
      norm: norm factory (default ``PRepBN(total_steps=60000)``).
      ln_epsilon: ε of the norms' LayerNorm (default 1e-6, SLAB-DeiT; 1e-5 for SLAB-Swin; None:
        the factory's own).
      deploy: folded inference mode (norms removed; use with `fold_slab_block`).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> blk = SLABBlock(num_heads=3)
      >>> x = jnp.ones((2, 16, 48))
      >>> v = blk.init(jax.random.key(0), x, train=True)
      >>> y, upd = blk.apply(v, x, train=True, mutable=["batch_stats"])
    """

    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    norm: Callable[..., nn.Module] = functools.partial(PRepBN, total_steps=60000)
    ln_epsilon: float | None = 1e-6
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        spatial_shape: tuple[int, int] | None = None,
        *,
        train: bool = False,
        step: Array | int | None = None,
    ) -> Float[Array, "B N C"]:
        c = x.shape[-1]
        dtype = self.dtype if self.dtype is not None else x.dtype
        kw = {} if step is None else {"step": step}
        if self.ln_epsilon is not None and not self.ln_epsilon > 0:
            raise ValueError(f"SLABBlock: ln_epsilon={self.ln_epsilon!r} must be > 0 or None")
        eps = {} if self.ln_epsilon is None else {"ln_epsilon": self.ln_epsilon}

        def norm(h, name):
            if self.deploy:
                return h
            return self.norm(dtype=dtype, param_dtype=self.param_dtype, name=name, **eps)(
                h, use_running_average=not train, **kw
            )

        # A folded norm leaves a bias in qkv even when qkv_bias is False: deploy keeps biases.
        attn = SimplifiedLinearAttention(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias or self.deploy,
            kernel_size=self.kernel_size,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )
        x = x + attn(norm(x, "norm1"), spatial_shape)
        hidden = int(c * self.mlp_ratio)
        h = nn.Dense(hidden, dtype=dtype, param_dtype=self.param_dtype, name="fc1")(
            norm(x, "norm2")
        )
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(c, dtype=dtype, param_dtype=self.param_dtype, name="fc2")(h)
        return x + h


def fold_slab_block(variables: dict, epsilon: float = 1e-5) -> dict:
    """Fold a trained `SLABBlock`'s norms (their inference RepBN) into qkv and fc1.

    Returns ``{"params": ...}`` for ``SLABBlock(..., deploy=True)``; exact up to rounding
    (Dense after RepBN, no padding involved). Expects the default `PRepBN` norms (variables
    ``norm{1,2}/repbn``); ``epsilon`` must be the RepBN ε.
    """
    params = dict(variables["params"])
    stats = variables["batch_stats"]

    def repbn(name):
        return {"params": params[name]["repbn"], "batch_stats": stats[name]["repbn"]}

    attn = dict(params["attn"])
    attn["qkv"] = fold_repbn_into_dense(repbn("norm1"), attn["qkv"], epsilon)
    params["attn"] = attn
    params["fc1"] = fold_repbn_into_dense(repbn("norm2"), params["fc1"], epsilon)
    del params["norm1"], params["norm2"]
    return {"params": params}
