"""ConvFirst and its MBConv baseline: where the grouped spatial conv sits in an inverted residual.

Lavin, "On the Efficiency of Convolutional Neural Networks", https://arxiv.org/abs/2404.03617.
The author's reference blocks are the PyTorch ``ConvFirst`` and ``MBConv`` classes of
andravin/spio ``scripts/profile_block.py`` (the fused CUDA kernels of that repository are an
implementation concern; here XLA fuses what it can). Both blocks use grouped convolutions of
group width 8 (not depthwise), BatchNorm after every conv, SiLU, expansion 4 and a residual add
when the input and output shapes agree:

- ``ConvFirst``: grouped k x k conv on the *narrow* input (``C / group_width`` groups, stride) ->
  BN -> 1x1 expand to ``expansion * C`` -> BN -> SiLU -> 1x1 project -> BN.
- ``MBConv``: 1x1 expand -> BN -> SiLU -> grouped k x k conv on the *wide* tensor
  (``expansion * C / group_width`` groups, stride) -> BN -> SiLU -> 1x1 project -> BN.

At equal width ConvFirst's spatial conv costs ``expansion`` times fewer MACs and parameters
(its groups are as wide, but there are ``expansion`` times fewer channels), and with a stride
its expansion runs at the output resolution; `block_macs` and `block_params` give the counts
the paper compares. Every conv + BN pair is a `ConvBN`, so all its modes (train / eval / tune /
deploy) apply; BN follows Flax (momentum 0.9 = PyTorch's 0.1, biased running variance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.conv_bn import ConvBN, resolve_convbn_mode
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "BLOCK_KINDS",
    "ConvFirstBlock",
    "MBConvBaselineBlock",
    "block_macs",
    "block_params",
    "check_block_args",
]

BLOCK_KINDS = ("convfirst", "mbconv")
# Logical axis names of NHWC activations; the trainer maps them to mesh axes.
ACTIVATION_AXES = ("batch", "height", "width", "channels")
# PyTorch's kaiming_normal_(mode="fan_out") convention of the project's ConvBN models.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_block_args(
    where: str, in_features: int, out_features: int, kernel_size: int, strides: int,
    group_width: int, expansion: int,
) -> None:  # fmt: skip
    """ValueError naming the argument when a ConvFirst / MBConv geometry is invalid."""
    for name, v in (("out_features", out_features), ("kernel_size", kernel_size),
                    ("strides", strides), ("group_width", group_width),
                    ("expansion", expansion)):  # fmt: skip
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    if in_features % group_width:
        raise ValueError(
            f"{where}: the input channels (x.shape[-1]={in_features}) must be a multiple of "
            f"group_width={group_width}"
        )


def _out_size(size: int, kernel_size: int, strides: int) -> int:
    """Output length of a conv with PyTorch padding ``k // 2``."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // strides + 1


def block_macs(
    kind: str,
    in_features: int,
    out_features: int,
    height: int,
    width: int,
    *,
    kernel_size: int = 3,
    strides: int = 1,
    group_width: int = 8,
    expansion: int = 4,
) -> dict[str, int]:
    """Multiply-accumulates of one ConvFirst / MBConv block on one ``height x width`` image.

    The comparison of arXiv 2404.03617: a grouped k x k conv of ``C`` output channels with
    groups of ``g`` input channels costs ``H' W' k^2 g C`` MACs, a 1x1 conv ``H W Cin Cout``.
    BatchNorm, activations and the residual add (no MACs) are left out.

    Args:
      kind: ``"convfirst"`` or ``"mbconv"``.
      in_features, out_features: block input and output channels.
      height, width: input spatial size.
      kernel_size, strides, group_width, expansion: the block's geometry.

    Returns:
      ``{"conv": ..., "expand": ..., "project": ..., "total": ...}``.

    Example:
      >>> cf, mb = block_macs("convfirst", 64, 64, 8, 8), block_macs("mbconv", 64, 64, 8, 8)
      >>> mb["conv"] // cf["conv"], cf["total"], mb["total"]
      (4, 2392064, 3276800)
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block_macs: kind must be one of {BLOCK_KINDS}, got {kind!r}")
    check_block_args("block_macs", in_features, out_features, kernel_size, strides, group_width,
                     expansion)  # fmt: skip
    mid = in_features * expansion
    ho, wo = _out_size(height, kernel_size, strides), _out_size(width, kernel_size, strides)
    k2 = kernel_size * kernel_size
    if kind == "convfirst":
        conv = ho * wo * k2 * group_width * in_features
        expand = ho * wo * in_features * mid
    else:
        expand = height * width * in_features * mid
        conv = ho * wo * k2 * group_width * mid
    project = ho * wo * mid * out_features
    return {"conv": conv, "expand": expand, "project": project,
            "total": conv + expand + project}  # fmt: skip


def block_params(
    kind: str,
    in_features: int,
    out_features: int,
    *,
    kernel_size: int = 3,
    group_width: int = 8,
    expansion: int = 4,
) -> int:
    """Parameters of one ConvFirst / MBConv block: conv kernels plus BN scale and bias."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block_params: kind must be one of {BLOCK_KINDS}, got {kind!r}")
    check_block_args("block_params", in_features, out_features, kernel_size, 1, group_width,
                     expansion)  # fmt: skip
    mid = in_features * expansion
    spatial_channels = in_features if kind == "convfirst" else mid
    conv = kernel_size * kernel_size * group_width * spatial_channels + 2 * spatial_channels
    expand = in_features * mid + 2 * mid
    project = mid * out_features + 2 * out_features
    return conv + expand + project


class _InvertedResidual(nn.Module):
    """The shared body: three ConvBNs in the subclass's order, residual, drop path."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    group_width: int = 8
    expansion: int = 4
    activation: Callable[[Array], Array] = nn.silu
    drop_path_rate: float = 0.0
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = conv_kernel_init

    conv_first = True

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "B h w F"]:
        """``[B, H', W', features]``, ``H' = floor((H - 1) / strides) + 1``.

        Args:
          x: NHWC input; its channels must be a multiple of ``group_width``.
          mode, train: the ConvBN mode (see `jaxblocks.layers.conv_bn.resolve_convbn_mode`).
          deterministic: no drop path (it needs the ``"dropout"`` rng otherwise).
        """
        where = type(self).__name__
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"{where}: x must be NHWC [B, H, W, C], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
        c = x.shape[-1]
        check_block_args(where, c, self.features, self.kernel_size, self.strides,
                         self.group_width, self.expansion)  # fmt: skip
        mode = resolve_convbn_mode(self, mode, train)
        mid = c * self.expansion
        p = self.kernel_size // 2
        conv = functools.partial(
            ConvBN, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init
        )
        spatial = functools.partial(
            conv, kernel_size=(self.kernel_size, self.kernel_size), strides=self.strides,
            padding=((p, p), (p, p)), name="conv",
        )  # fmt: skip
        if self.conv_first:
            y = spatial(c, feature_group_count=c // self.group_width)(x, mode)
            y = conv(mid, (1, 1), padding="VALID", activation=self.activation, name="expand")(
                y, mode
            )
        else:
            y = conv(mid, (1, 1), padding="VALID", activation=self.activation, name="expand")(
                x, mode
            )
            y = spatial(mid, feature_group_count=mid // self.group_width,
                        activation=self.activation)(y, mode)  # fmt: skip
        has_residual = self.strides == 1 and c == self.features
        stochastic = self.drop_path_rate > 0.0 and not deterministic
        # Without drop path the add happens inside the last ConvBN (one tensor in tune mode).
        residual = x if has_residual and not stochastic else None
        y = conv(self.features, (1, 1), padding="VALID", name="project")(y, mode, residual=residual)
        if has_residual and stochastic:
            y = x + drop_path(self, y, self.drop_path_rate, deterministic)
        return nn.with_logical_constraint(y, ACTIVATION_AXES)


class ConvFirstBlock(_InvertedResidual):
    """ConvFirst block (Lavin, "On the Efficiency of Convolutional Neural Networks",
    https://arxiv.org/abs/2404.03617): the grouped spatial conv first, then the expansion.

    Unlike `MBConvBaselineBlock` (and MobileNetV2's inverted residual), the k x k conv runs on
    the narrow input, with ``C / group_width`` groups of ``group_width`` channels and no
    activation after its BN; the block is then an MLP (1x1 expand ``x expansion`` -> BN -> SiLU
    -> 1x1 project -> BN). At equal width it has ``expansion`` times fewer spatial-conv MACs
    and parameters (`block_macs`), and the whole block is a single-pass candidate for block
    fusion (the expanded tensor never needs to reach memory). Residual add when stride is 1 and
    the channels are unchanged.

    Attributes:
      features: output channels.
      kernel_size: of the grouped conv (3; padding ``k // 2``).
      strides: of the grouped conv.
      group_width: input channels per group of the grouped conv (8).
      expansion: hidden width ``expansion * C`` of the MLP (4).
      activation: after the expansion's BN (SiLU).
      drop_path_rate: stochastic depth of the residual branch (active with
        ``deterministic=False``).
      mode: default ConvBN mode; dtype, param_dtype, kernel_init: of every ConvBN.

    Variables: ``conv``, ``expand``, ``project`` (each a `ConvBN`), as the reference's
    ``nn.Sequential(conv, conv_bn, exp, exp_bn, exp_act, prj, prj_bn)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = ConvFirstBlock(32)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(1), x)
      >>> block.apply(variables, x, mode="eval").shape
      (2, 8, 8, 32)
    """

    conv_first = True


class MBConvBaselineBlock(_InvertedResidual):
    """MBConv baseline of the ConvFirst paper (https://arxiv.org/abs/2404.03617): 1x1 expand ->
    BN -> SiLU -> grouped k x k conv -> BN -> SiLU -> 1x1 project -> BN (+ input).

    The inverted residual of MobileNetV2/EfficientNet, here without squeeze-and-excitation and
    with a *grouped* (group width 8) instead of depthwise spatial conv, as the paper's
    comparison defines it: its spatial conv runs on the ``expansion``-times wider tensor
    (``expansion * C / group_width`` groups). Attributes and variables as `ConvFirstBlock`
    (the activation also follows the grouped conv's BN).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = MBConvBaselineBlock(64, strides=2)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(1), x)
      >>> block.apply(variables, x, mode="eval").shape
      (2, 4, 4, 64)
    """

    conv_first = False
