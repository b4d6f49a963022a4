"""Full models. Importing this package imports every module in it, which registers the models."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

from jaxblocks.models.gla_lm import GLALM as GLALM  # noqa: E402
from jaxblocks.models.gla_lm import GLAConfig as GLAConfig  # noqa: E402
from jaxblocks.models.gla_lm import generate as gla_generate  # noqa: E402
from jaxblocks.models.gla_lm import init_cache as gla_init_cache  # noqa: E402
from jaxblocks.models.mobilenet import MobileNetV2 as MobileNetV2  # noqa: E402
from jaxblocks.models.mobilenet import MobileNetV2Config as MobileNetV2Config  # noqa: E402
from jaxblocks.models.resnet import ResNet as ResNet  # noqa: E402
from jaxblocks.models.resnet import ResNetConfig as ResNetConfig  # noqa: E402
from jaxblocks.models.rnn_lm import RNNLM as RNNLM  # noqa: E402
from jaxblocks.models.rnn_lm import RNNLMConfig as RNNLMConfig  # noqa: E402

__all__ = [
    "GLALM",
    "GLAConfig",
    "MobileNetV2",
    "MobileNetV2Config",
    "RNNLM",
    "RNNLMConfig",
    "ResNet",
    "ResNetConfig",
    "gla_generate",
    "gla_init_cache",
]
