"""Model compression and structure regularisers over parameter trees and Linen layers.

* `lorth_penalty`, `orthogonality_error`: orthogonal convolutions (Achour et al., JMLR 2022).
* `QuantSpec`, `fake_quant`, `quantize`/`dequantize`, `pack_int`/`unpack_int`,
  `quantize_model`: fake quantisation with tensor/channel/group/block scales (the core of CBQ and
  BCT).
* `prune`, `polynomial_sparsity`, `magnitude_mask`, `watts_strogatz_mask`,
  `barabasi_albert_mask`: gradual magnitude pruning and random-graph masks (papers 58, 62).
* `binarize`, `BinaryConv`, `BinaryDense`, `mst_plan`, `delta_conv`, `count_ops`,
  `mst_distance_penalty`: binary networks and MST-compression (paper 29).
* `BCTRecipe`, `bct_compress`, `bct_weights`, `bct_activation_quant`: blockwise compression of
  every weight and activation of a Transformer without retraining (paper 60).
* `to_block_sparse`, `block_sparse_pointwise`, `ell_pointwise`, `bcoo_pointwise`: the sparse
  1×1 convolution inference path of Fast Sparse ConvNets (paper 58).
* `CBQRecipe`, `CBQ_RECIPES`, `cbq_quantize`, `rtn_quantize`, `quantized_apply`: cross-block
  quantisation with LoRA-Rounding and outlier preprocessing for the project's LMs (paper 42).
"""

from jaxblocks.compress.bct import BCTRecipe as BCTRecipe
from jaxblocks.compress.bct import bct_activation_quant as bct_activation_quant
from jaxblocks.compress.bct import bct_compress as bct_compress
from jaxblocks.compress.bct import bct_weights as bct_weights
from jaxblocks.compress.binary import BinaryConv as BinaryConv
from jaxblocks.compress.binary import BinaryDense as BinaryDense
from jaxblocks.compress.binary import MSTPlan as MSTPlan
from jaxblocks.compress.binary import binarize as binarize
from jaxblocks.compress.binary import count_ops as count_ops
from jaxblocks.compress.binary import delta_conv as delta_conv
from jaxblocks.compress.binary import hamming_distances as hamming_distances
from jaxblocks.compress.binary import mst_distance_penalty as mst_distance_penalty
from jaxblocks.compress.binary import mst_plan as mst_plan
from jaxblocks.compress.cbq import CBQ_RECIPES as CBQ_RECIPES
from jaxblocks.compress.cbq import CBQRecipe as CBQRecipe
from jaxblocks.compress.cbq import cbq_quantize as cbq_quantize
from jaxblocks.compress.cbq import detect_outliers as detect_outliers
from jaxblocks.compress.cbq import lora_rounded_weight as lora_rounded_weight
from jaxblocks.compress.cbq import quantized_apply as quantized_apply
from jaxblocks.compress.cbq import rtn_quantize as rtn_quantize
from jaxblocks.compress.orthogonal import (
    check_orthogonal_conv_exists as check_orthogonal_conv_exists,
)
from jaxblocks.compress.orthogonal import conv_operator as conv_operator
from jaxblocks.compress.orthogonal import lorth_penalty as lorth_penalty
from jaxblocks.compress.orthogonal import orthogonality_error as orthogonality_error
from jaxblocks.compress.quantize import GRANULARITIES as GRANULARITIES
from jaxblocks.compress.quantize import QuantizedTensor as QuantizedTensor
from jaxblocks.compress.quantize import QuantSpec as QuantSpec
from jaxblocks.compress.quantize import compute_scales as compute_scales
from jaxblocks.compress.quantize import dequantize as dequantize
from jaxblocks.compress.quantize import fake_quant as fake_quant
from jaxblocks.compress.quantize import pack_int as pack_int
from jaxblocks.compress.quantize import quantize as quantize
from jaxblocks.compress.quantize import quantize_model as quantize_model
from jaxblocks.compress.quantize import unpack_int as unpack_int
from jaxblocks.compress.sparse_conv import BlockSparseKernel as BlockSparseKernel
from jaxblocks.compress.sparse_conv import bcoo_pointwise as bcoo_pointwise
from jaxblocks.compress.sparse_conv import block_sparse_pointwise as block_sparse_pointwise
from jaxblocks.compress.sparse_conv import ell_pointwise as ell_pointwise
from jaxblocks.compress.sparse_conv import to_block_sparse as to_block_sparse
from jaxblocks.compress.sparsity import PruneState as PruneState
from jaxblocks.compress.sparsity import barabasi_albert_mask as barabasi_albert_mask
from jaxblocks.compress.sparsity import magnitude_mask as magnitude_mask
from jaxblocks.compress.sparsity import polynomial_sparsity as polynomial_sparsity
from jaxblocks.compress.sparsity import prune as prune
from jaxblocks.compress.sparsity import sparsity_of as sparsity_of
from jaxblocks.compress.sparsity import watts_strogatz_mask as watts_strogatz_mask
