"""Normalization layers beyond Flax's own, one module per family.

* `batch`: Ghost BN, PowerNorm, Batch-Channel Normalization (statistics over the batch);
* `evonorm`: EvoNorm-B0 / EvoNorm-S0;
* `weight_standardization`: weight standardization and `WSConv`;
* `repbn`: RepBN / PRepBN (SLAB) and their inference fold;
* `poincare`: Poincaré midpoint batch norm (Poincaré ResNet, batch statistics only).

Every module follows `flax.linen.BatchNorm` conventions: channels last, statistics computed in
float32 and the output cast to ``dtype``, running statistics in the ``batch_stats`` collection with
``momentum`` used as a *decay* (``r <- momentum * r + (1 - momentum) * batch``; PyTorch's momentum
``m`` corresponds to ``1 - m`` here) and biased (``1/n``) batch variance, and
``use_running_average`` given either to the constructor or the call (`nn.merge_param`).

The math of each layer lives in a small pure function next to it (``ghost_batch_norm``,
``power_norm``, ``evonorm_b0``, ``evonorm_s0``, ``weight_standardize``, ``batch_channel_norm``,
``rep_batch_norm``), so it can be tested alone and reused outside Linen.

Also here: ``LayerNorm`` (Flax's, re-exported).
"""

from flax.linen import LayerNorm as LayerNorm  # Ba et al. 2016, arXiv 1607.06450 (re-export)

from jaxblocks.layers.norm.batch import (
    POWER_NORM_BACKWARD_COLLECTION as POWER_NORM_BACKWARD_COLLECTION,
)
from jaxblocks.layers.norm.batch import BatchChannelNorm as BatchChannelNorm
from jaxblocks.layers.norm.batch import GhostBatchNorm as GhostBatchNorm
from jaxblocks.layers.norm.batch import PowerNorm as PowerNorm
from jaxblocks.layers.norm.batch import batch_channel_norm as batch_channel_norm
from jaxblocks.layers.norm.batch import ghost_batch_norm as ghost_batch_norm
from jaxblocks.layers.norm.batch import power_norm as power_norm
from jaxblocks.layers.norm.batch import sequential_ema as sequential_ema
from jaxblocks.layers.norm.evonorm import EvoNormB0 as EvoNormB0
from jaxblocks.layers.norm.evonorm import EvoNormS0 as EvoNormS0
from jaxblocks.layers.norm.evonorm import evonorm_b0 as evonorm_b0
from jaxblocks.layers.norm.evonorm import evonorm_s0 as evonorm_s0
from jaxblocks.layers.norm.repbn import PRepBN as PRepBN
from jaxblocks.layers.norm.repbn import RepBN as RepBN
from jaxblocks.layers.norm.repbn import fold_repbn_into_dense as fold_repbn_into_dense
from jaxblocks.layers.norm.repbn import prepbn_lambda as prepbn_lambda
from jaxblocks.layers.norm.repbn import rep_batch_norm as rep_batch_norm
from jaxblocks.layers.norm.repbn import repbn_affine as repbn_affine
from jaxblocks.layers.norm.weight_standardization import WSConv as WSConv
from jaxblocks.layers.norm.weight_standardization import weight_standardize as weight_standardize

__all__ = [
    "BatchChannelNorm",
    "EvoNormB0",
    "EvoNormS0",
    "GhostBatchNorm",
    "LayerNorm",
    "POWER_NORM_BACKWARD_COLLECTION",
    "PRepBN",
    "PowerNorm",
    "RepBN",
    "WSConv",
    "batch_channel_norm",
    "evonorm_b0",
    "evonorm_s0",
    "fold_repbn_into_dense",
    "ghost_batch_norm",
    "power_norm",
    "prepbn_lambda",
    "rep_batch_norm",
    "repbn_affine",
    "sequential_ema",
    "weight_standardize",
]
from jaxblocks.layers.norm.poincare import PoincareBatchNorm as PoincareBatchNorm
from jaxblocks.layers.norm.poincare import poincare_batch_norm as poincare_batch_norm
