"""Poincaré ResNet: a CIFAR ResNet-20/32 built entirely from Poincaré ball layers.

van Spengler, Berkhout, Mettes, "Poincaré ResNet", ICCV 2023, https://arxiv.org/abs/2303.14027.
Official code: maxvanspengler/poincare-resnet ``models/resnets/hyperbolic.py``
(``HyperbolicResNet``) and ``parse_model_from_name.py``, whose model names
``hyperbolic-8-16-32-resnet-20`` / ``-32`` the presets ``hyperbolic_resnet20`` /
``hyperbolic_resnet32`` repeat (block depth ``(depth - 2) / 6`` per group).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.poincare_resnet import ACTIVATION_AXES, PoincareResidualBlock, SkipAxis
from jaxblocks.layers.norm.poincare import PoincareBatchNorm
from jaxblocks.layers.poincare import MlrLambda, PoincareConv2d, PoincareLinear, check_curvature
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "HYPERBOLIC_RESNET_PRESETS",
    "HyperbolicResNet",
    "HyperbolicResNetConfig",
    "hyperbolic_resnet_param_count",
]

Dtype = Any


@dataclasses.dataclass(frozen=True)
class HyperbolicResNetConfig:
    """Architecture of a `HyperbolicResNet` (https://arxiv.org/abs/2303.14027).

    The default is the official ``hyperbolic-8-16-32-resnet-20`` on CIFAR-10.

    Attributes:
      num_classes: classifier outputs (10 for CIFAR-10, 100 for CIFAR-100); 0 returns the
        pooled features.
      image_size: side of the square input images (32 for CIFAR; the official
        ``AvgPool2d(8)`` assumes it).
      in_channels: image channels.
      channels: widths of the three groups (8, 16, 32).
      depths: residual blocks per group (3 for ResNet-20, 5 for ResNet-32).
      c: curvature of every ball (the official ``init_c = 0.1``, fixed).
      skip_order: ``"fr"`` (``f(x) ⊕ r``, official) or ``"rf"``.
      skip_axis: ``"channel"`` (the paper) or ``"width"`` (the official code), see
        `jaxblocks.blocks.poincare_resnet.poincare_skip`.
      mlr_lambda: ``"hnn++"`` or ``"official"``, see
        `jaxblocks.layers.poincare.poincare_hyperplane_dists`.
    """

    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (8, 16, 32)
    depths: tuple[int, ...] = (3, 3, 3)
    c: float = 0.1
    skip_order: Literal["fr", "rf"] = "fr"
    skip_axis: SkipAxis = "channel"
    mlr_lambda: MlrLambda = "hnn++"

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    for name in ("image_size", "in_channels"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"HyperbolicResNet: {name}={v!r} must be a positive int")
    if not cfg.depths or len(cfg.channels) != len(cfg.depths):
        raise ValueError(f"HyperbolicResNet: channels={cfg.channels!r} and depths={cfg.depths!r} "
                         "must be non-empty with one entry per group")  # fmt: skip
    if any(int(d) < 1 for d in cfg.depths) or any(int(ch) < 1 for ch in cfg.channels):
        raise ValueError(f"HyperbolicResNet: channels={cfg.channels!r} and depths={cfg.depths!r} "
                         "must be positive")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"HyperbolicResNet: num_classes={cfg.num_classes} must be >= 0")
    check_curvature("HyperbolicResNet", cfg.c)


def hyperbolic_resnet_param_count(cfg: HyperbolicResNetConfig) -> int:
    """Trainable parameters of the official ``HyperbolicResNet`` with ``cfg``'s sizes, layer by
    layer: a k×k Poincaré conv has ``k²·in·out + out``, a Poincaré BN ``C + 1`` (vector mean,
    scalar variance), the head ``in·classes + classes``. The official modules also register
    one frozen curvature scalar per ball (``requires_grad=False``), not counted here."""

    def conv(k: int, i: int, o: int) -> int:
        return k * k * i * o + o

    def bn(ch: int) -> int:
        return ch + 1

    n = conv(3, cfg.in_channels, cfg.channels[0]) + bn(cfg.channels[0])
    cin = cfg.channels[0]
    for g, (ch, depth) in enumerate(zip(cfg.channels, cfg.depths, strict=True)):
        for j in range(depth):
            stride = 2 if g > 0 and j == 0 else 1
            n += conv(3, cin, ch) + bn(ch) + conv(3, ch, ch) + bn(ch)
            if stride != 1 or cin != ch:
                n += conv(1, cin, ch)
            cin = ch
    if cfg.num_classes:
        n += cin * cfg.num_classes + cfg.num_classes
    return n


class HyperbolicResNet(nn.Module):
    """Poincaré ResNet classifier (van Spengler et al., https://arxiv.org/abs/2303.14027).

    The CIFAR ResNet (He et al.) with every layer on the Poincaré ball: a 3×3 `PoincareConv2d`
    stem (whose β-concatenation and `expmap0` map the image, read as a tangent vector at the
    origin, into the ball) → `PoincareBatchNorm` → ReLU, three groups of
    `PoincareResidualBlock` (the first block of groups 2 and 3 with stride 2 and a 1×1 Poincaré
    conv on the skip), global average pooling of the tangent vectors (the official
    ``AvgPool2d(8)`` at 32×32 inputs), and a `PoincareLinear` head (``expmap0`` → Poincaré FC →
    ``logmap0``) whose output are the logits. Activations between layers are tangent vectors at
    the origin (each layer ends with ``logmap0``), so ReLU and pooling act there, as in the
    official code. Identity initialisation (``½ I``) in every conv and in the head.

    Batch norm always uses batch statistics (official; see `PoincareBatchNorm`), so there is no
    ``batch_stats`` collection and no train/eval switch; evaluate with reasonably large batches.

    Deviations from the official code (defaults; the official behaviour is one field away):
    ``skip_axis="channel"`` (the official code adds the skip over the width axis of NCHW
    tensors) and ``mlr_lambda="hnn++"`` (the official ``linreg.py`` writes the conformal factor
    as ``2(1 - c‖x‖²)`` instead of ``2/(1 - c‖x‖²)``); with ``skip_axis="width",
    mlr_lambda="official"`` the forward matches the official ``HyperbolicResNet`` on the same
    weights. The curvature is fixed (official ``learnable=False``); the official manual backward
    passes are replaced by autodiff (see `jaxblocks.layers.poincare`).

    Stage features: ``features=True`` returns the tuple of the three groups' outputs
    ``[B, H/s, W/s, C]`` (tangent vectors) instead of the logits; ``num_classes=0`` returns the
    pooled features.

    Attributes:
      num_classes, image_size, in_channels, channels, depths, c, skip_order, skip_axis,
        mlr_lambda: see `HyperbolicResNetConfig`.
      dtype: activation dtype (None: the input's, integers promoted to float32); the
        hyperbolic math runs in float32.
      param_dtype: parameter dtype.

    Example:
      >>> import jax
      >>> model = HyperbolicResNet(channels=(4, 8, 8), depths=(1, 1, 1), image_size=8)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> model.apply(variables, x).shape
      (2, 10)
    """

    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (8, 16, 32)
    depths: tuple[int, ...] = (3, 3, 3)
    c: float = 0.1
    skip_order: Literal["fr", "rf"] = "fr"
    skip_axis: SkipAxis = "channel"
    mlr_lambda: MlrLambda = "hnn++"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `HyperbolicResNetConfig`; kwargs override config fields and attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images ``[B, image_size, image_size, in_channels]``.
          features: return the groups' outputs instead (see the class docstring).
        """
        _validate(self)
        want = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"HyperbolicResNet: x must be NHWC images [batch, {want[0]}, {want[1]}, "
                f"{want[2]}] (image_size={self.image_size}, in_channels={self.in_channels}), "
                f"got shape {x.shape}"
            )
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        kw = dict(c=self.c, dtype=dtype, param_dtype=self.param_dtype)
        x = PoincareConv2d(
            self.channels[0], (3, 3), 1, 1, mlr_lambda=self.mlr_lambda, name="conv", **kw
        )(x)
        x = nn.relu(PoincareBatchNorm(name="bn", **kw)(x))
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        outputs = []
        for g, (ch, depth) in enumerate(zip(self.channels, self.depths, strict=True)):
            for j in range(depth):
                x = PoincareResidualBlock(
                    ch,
                    stride=2 if g > 0 and j == 0 else 1,
                    skip_order=self.skip_order,
                    skip_axis=self.skip_axis,
                    mlr_lambda=self.mlr_lambda,
                    name=f"group{g + 1}_{j}",
                    **kw,
                )(x)
            outputs.append(x)
        if features:
            return tuple(outputs)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return PoincareLinear(self.num_classes, mlr_lambda=self.mlr_lambda, name="fc", **kw)(x)


HYPERBOLIC_RESNET_PRESETS: dict[str, HyperbolicResNetConfig] = {
    "hyperbolic_resnet20": HyperbolicResNetConfig(depths=(3, 3, 3)),
    "hyperbolic_resnet32": HyperbolicResNetConfig(depths=(5, 5, 5)),
}


def _example_image(config: HyperbolicResNetConfig) -> Array:
    n = 2 * config.image_size * config.image_size * config.in_channels
    x = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 0.37)
    return x.reshape(2, config.image_size, config.image_size, config.in_channels)


register_presets(
    HyperbolicResNet.from_config,
    HYPERBOLIC_RESNET_PRESETS,
    example_input=_example_image,
    doc="{name}: the official hyperbolic-8-16-32-resnet (Poincaré ResNet, arXiv 2303.14027) on "
    "CIFAR-10 (num_classes=100 for CIFAR-100); kwargs override config fields.",
    paper=Paper(
        "Poincaré ResNet",
        arxiv="2303.14027",
        code="https://github.com/maxvanspengler/poincare-resnet",
    ),  # fmt: skip
    params_source="no published count (the paper and README give none); computed: the official "
    "torch HyperbolicResNet of parse_model_from_name('hyperbolic-8-16-32-resnet-20'/'-32', 10) "
    "has 68,757 / 117,601 trainable parameters (plus one frozen curvature scalar per registered "
    "ball), which `hyperbolic_resnet_param_count` and this port reproduce",
    tiny={"channels": (4, 8, 8), "depths": (1, 1, 1), "image_size": 8},
)
