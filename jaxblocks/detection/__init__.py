"""Detection post-processing: Soft-NMS (https://arxiv.org/abs/1704.04503)."""

from jaxblocks.detection.soft_nms import METHODS as METHODS
from jaxblocks.detection.soft_nms import SoftNMSResult as SoftNMSResult
from jaxblocks.detection.soft_nms import box_iou as box_iou
from jaxblocks.detection.soft_nms import soft_nms as soft_nms
