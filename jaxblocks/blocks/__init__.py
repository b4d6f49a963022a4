"""The papers' residual blocks, composed from layers. Public re-exports only."""

from jaxblocks.blocks.gla import GLABlock as GLABlock
from jaxblocks.blocks.inception_next import InceptionDWConv2d as InceptionDWConv2d
from jaxblocks.blocks.inception_next import MetaNeXtBlock as MetaNeXtBlock
from jaxblocks.blocks.inception_next import MlpClassifierHead as MlpClassifierHead
from jaxblocks.blocks.lmuformer import Conv1dEmbedding as Conv1dEmbedding
from jaxblocks.blocks.lmuformer import LMUFormerBlock as LMUFormerBlock
from jaxblocks.blocks.lmuformer import LMUMixer as LMUMixer
from jaxblocks.blocks.msvmamba import MSVMambaBlock as MSVMambaBlock
from jaxblocks.blocks.rev_mbconv3d import MBConv3D as MBConv3D
from jaxblocks.blocks.rev_mbconv3d import ReversibleMBConv3DStage as ReversibleMBConv3DStage
from jaxblocks.blocks.scse import SCSE_MODES as SCSE_MODES
from jaxblocks.blocks.scse import ChannelSE as ChannelSE
from jaxblocks.blocks.scse import ChannelSpatialSE as ChannelSpatialSE
from jaxblocks.blocks.scse import SpatialSE as SpatialSE
from jaxblocks.blocks.scse import channel_se as channel_se
from jaxblocks.blocks.scse import combine_se as combine_se
from jaxblocks.blocks.scse import spatial_se as spatial_se
from jaxblocks.blocks.slab import SLABBlock as SLABBlock
from jaxblocks.blocks.slab import fold_slab_block as fold_slab_block
from jaxblocks.blocks.tcn import TCN as TCN
from jaxblocks.blocks.tcn import TCNCA as TCNCA
from jaxblocks.blocks.tcn import TemporalBlock as TemporalBlock
from jaxblocks.blocks.tcn import chunked_attention as chunked_attention
from jaxblocks.blocks.tcn import tcn_receptive_field as tcn_receptive_field
