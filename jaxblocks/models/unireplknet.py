"""UniRepLKNet image classifiers (A, F, P, N, T, S, B, L, XL) built from `UniRepLKNetBlock`.

Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point
Cloud, Time-Series and Image Recognition", https://arxiv.org/abs/2311.15599 (journal: "Scaling
Up Your Kernels", https://arxiv.org/abs/2410.08049). Official code: AILab-CVC/UniRepLKNet
``unireplknet.py`` (presets, kernel-size tables and layer layout follow it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.unireplknet import (
    DILATED_REPARAM_BRANCHES,
    UniRepLKNetBlock,
    default_kernel_init,
    reparameterize,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "DEFAULT_KERNEL_SIZES",
    "UNIREPLKNET_DEPLOY_PARAMS",
    "UNIREPLKNET_LARGE_PRESETS",
    "UNIREPLKNET_PARAMS",
    "UNIREPLKNET_PRESETS",
    "UniRepLKNet",
    "UniRepLKNetConfig",
    "default_kernel_sizes",
    "reparameterize",
    "unireplknet_param_count",
]

Dtype = Any
ACTIVATION_AXES = ("batch", "height", "width", "channels")
CONV_AXES = (None, None, "conv_in", "conv_out")
LN_EPSILON = 1e-6  # every LayerNorm of UniRepLKNet (stem, downsampling, head)

_L = 13  # the large kernel of every preset
# Official ``default_*_kernel_sizes``, keyed by the depths they belong to: 3x3 in stage 1, 13x13
# in stages 2 and 4; stage 3 is all 13 (A/F/P/N), alternates 13, 3 (T) or 13, 3, 3 (S/B/L/XL).
DEFAULT_KERNEL_SIZES: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3, 3), (_L, _L), (_L,) * 6, (_L, _L)),
    (2, 2, 8, 2): ((3, 3), (_L, _L), (_L,) * 8, (_L, _L)),
    (3, 3, 18, 3): ((3, 3, 3), (_L,) * 3, (_L, 3) * 9, (_L,) * 3),
    (3, 3, 27, 3): ((3, 3, 3), (_L,) * 3, (_L, 3, 3) * 9, (_L,) * 3),
}


def default_kernel_sizes(depths: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The official kernel size of every block for ``depths`` (a key of `DEFAULT_KERNEL_SIZES`)."""
    depths = tuple(int(d) for d in depths)
    if depths not in DEFAULT_KERNEL_SIZES:
        raise ValueError(
            f"UniRepLKNet: no default kernel sizes for depths={depths}; the official tables "
            f"cover {sorted(DEFAULT_KERNEL_SIZES)}. Pass kernel_sizes, one tuple per stage, e.g. "
            "((3, 3), (13, 13), (13,) * 6, (13, 13))"
        )
    return DEFAULT_KERNEL_SIZES[depths]


@dataclasses.dataclass(frozen=True)
class UniRepLKNetConfig:
    """Architecture of a `UniRepLKNet` (https://arxiv.org/abs/2311.15599).

    The default is the official ``unireplknet_a``; `UNIREPLKNET_PRESETS` holds the others.

    Attributes:
      num_classes: classifier outputs; 0 returns the normalised pooled features.
      depths: blocks per stage.
      dims: channels per stage (same length as ``depths``; ``dims[0]`` even, the stem's first
        conv has ``dims[0] // 2``).
      kernel_sizes: depthwise kernel size of every block, one tuple per stage (None: the
        official default for ``depths``, `default_kernel_sizes`); 0, 3, 5 or a key of
        `DILATED_REPARAM_BRANCHES`.
      drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
      layer_scale_init_value: initial layer scale of every block (None/0: no layer scale).
      head_init_scale: factor on the classifier's initial weights (official ``head_init_scale``).
      deploy: build the re-parameterised inference form (variables from `reparameterize`).
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (40, 80, 160, 320)
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    drop_path_rate: float = 0.0
    layer_scale_init_value: float | None = 1e-6
    head_init_scale: float = 1.0
    deploy: bool = False

    def __post_init__(self):
        _validate(self)


def _kernel_sizes(cfg: Any) -> tuple[tuple[int, ...], ...]:
    if cfg.kernel_sizes is None:
        return default_kernel_sizes(cfg.depths)
    return tuple(tuple(int(k) for k in stage) for stage in cfg.kernel_sizes)


def _validate(cfg: Any) -> None:
    """Shared checks of `UniRepLKNetConfig` and the `UniRepLKNet` attributes."""
    depths, dims = tuple(cfg.depths), tuple(cfg.dims)
    if not depths or any(int(d) < 1 for d in depths):
        raise ValueError(f"UniRepLKNet: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    if len(dims) != len(depths) or any(int(c) < 4 for c in dims) or dims[0] % 2:
        raise ValueError(
            f"UniRepLKNet: dims must have one entry >= 4 per stage (len(depths) = {len(depths)}; "
            f"SE needs C // 4 >= 1) with dims[0] even (the stem's C / 2), got {cfg.dims!r}"
        )
    kernels = _kernel_sizes(cfg)
    if len(kernels) != len(depths) or any(
        len(ks) != d for ks, d in zip(kernels, depths, strict=True)
    ):
        raise ValueError(
            f"UniRepLKNet: kernel_sizes must have one tuple per stage with one entry per block "
            f"(depths={depths}), got {cfg.kernel_sizes!r}"
        )
    supported = {0, 3, 5, *DILATED_REPARAM_BRANCHES}
    bad = sorted({k for ks in kernels for k in ks} - supported)
    if bad:
        raise ValueError(
            f"UniRepLKNet: kernel_sizes contain unsupported sizes {bad}; supported are "
            f"{sorted(supported)}"
        )
    if cfg.num_classes < 0:
        raise ValueError(f"UniRepLKNet: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"UniRepLKNet: drop_path_rate must be in [0, 1), got "
                         f"{cfg.drop_path_rate!r}")  # fmt: skip


class UniRepLKNet(nn.Module):
    """UniRepLKNet classifier (Ding et al., https://arxiv.org/abs/2311.15599).

    A ConvNeXt-shaped four-stage network whose blocks are `UniRepLKNetBlock` (large dilated
    depthwise kernels re-parameterisable into one conv, SE, GRN FFN, BatchNorm): stem conv 3x3
    stride 2 (C/2) -> LN -> GELU -> conv 3x3 stride 2 (C) -> LN; between stages conv 3x3 stride
    2 -> LN; head: global average pool -> LN -> Linear. LayerNorms have eps 1e-6 and, being
    over the channels of channels-last maps, equal the official ``channels_first`` LayerNorm.

    Parameter layout and count match the official ``UniRepLKNet`` (the registry test checks the
    presets' counts). Deviations from the official code: channels-last; BatchNorm follows Flax
    (momentum 0.9 = torch's 0.1, biased running variance, see `DilatedReparamBlock`); the
    ``deploy`` form is built from trained variables with the pure function `reparameterize`
    rather than by mutating modules; the iGEMM large-kernel CUDA conv, gradient checkpointing
    (``with_cp``), SyncBN and the OpenMMLab backbone mode are left out; any number of stages.

    Train or eval: ``train=True`` normalises with batch statistics and updates the running ones
    (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running statistics;
    ``train=None`` (default) trains when the ``batch_stats`` collection is mutable or the model
    is initialising, and otherwise raises a ValueError. The deploy form has no BatchNorm and
    runs in eval. Drop path (off at the defaults) needs an rng named ``"dropout"``.

    Attributes:
      num_classes, depths, dims, kernel_sizes, drop_path_rate, layer_scale_init_value,
        head_init_scale, deploy: see `UniRepLKNetConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = UniRepLKNet(num_classes=10, depths=(1, 1), dims=(16, 32),
      ...                     kernel_sizes=((3,), (7,)))
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
      >>> fast = model.clone(deploy=True)
      >>> fast.apply(reparameterize(variables), x).shape
      (2, 10)
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (40, 80, 160, 320)
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    drop_path_rate: float = 0.0
    layer_scale_init_value: float | None = 1e-6
    head_init_scale: float = 1.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `UniRepLKNetConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    def _resolve_train(self, train: bool | None) -> bool:
        if self.deploy:  # the fused inference form has no BatchNorm left to train
            if train:
                raise ValueError("UniRepLKNet: deploy=True is the inference form; train=True "
                                 "needs the train form (deploy=False)")  # fmt: skip
            if train is not None and not isinstance(train, bool):
                raise TypeError(f"UniRepLKNet: train must be a bool or None, got {train!r}")
            return False
        return resolve_train(self, train)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (the normalised pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images; H and W should be multiples of ``4 * 2**(len(depths) - 1)`` (other
            sizes are rounded up by the padded stride-2 convs, as in torch).
          train: see the class docstring.
          features: return the stage outputs ``([B, H/4, W/4, dims[0]], …)`` instead, the final
            norm and head unused (timm's ``features_only``).
        """
        _validate(self)
        train = self._resolve_train(train)
        if x.ndim != 4:
            raise ValueError(f"UniRepLKNet: x must be NHWC [B, H, W, C], got shape {x.shape}")
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        dtype = x.dtype

        def conv(features: int, name: str) -> Callable[[Array], Array]:
            return nn.Conv(
                features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
                name=name,
            )  # fmt: skip

        def norm(name: str) -> Callable[[Array], Array]:
            return nn.LayerNorm(
                epsilon=LN_EPSILON, dtype=dtype, param_dtype=self.param_dtype, name=name
            )

        # Names follow the official ``downsample_layers.{i}.{j}`` / ``stages.{i}.{j}``.
        x = conv(self.dims[0] // 2, "downsample_layers_0_0")(x)
        x = nn.gelu(norm("downsample_layers_0_1")(x), approximate=False)
        x = conv(self.dims[0], "downsample_layers_0_3")(x)
        x = norm("downsample_layers_0_4")(x)
        kernels = _kernel_sizes(self)
        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, dim in enumerate(self.dims):
            if i > 0:
                x = conv(dim, f"downsample_layers_{i}_0")(x)
                x = norm(f"downsample_layers_{i}_1")(x)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            for j in range(self.depths[i]):
                x = UniRepLKNetBlock(
                    kernel_size=kernels[i][j],
                    layer_scale_init_value=self.layer_scale_init_value,
                    drop_path=rates[i][j],
                    deploy=self.deploy,
                    dtype=dtype,
                    param_dtype=self.param_dtype,
                    name=f"stages_{i}_{j}",
                )(x, train=train)
                x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)
        if features:
            return tuple(outputs)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)  # [B, C]
        pooled = norm("norm")(pooled)
        if self.num_classes == 0:
            return pooled
        scale = self.head_init_scale

        def head_init(init: Callable[..., Array]) -> Callable[..., Array]:
            return lambda key, shape, dtype=jnp.float32: scale * init(key, shape, dtype)

        return nn.Dense(
            self.num_classes,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                head_init(default_kernel_init), ("channels", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="head",
        )(pooled)


_AFP = (2, 2, 6, 2)
_SBLXL = (3, 3, 27, 3)
UNIREPLKNET_PRESETS: dict[str, UniRepLKNetConfig] = {
    "unireplknet_a": UniRepLKNetConfig(depths=_AFP, dims=(40, 80, 160, 320)),
    "unireplknet_f": UniRepLKNetConfig(depths=_AFP, dims=(48, 96, 192, 384)),
    "unireplknet_p": UniRepLKNetConfig(depths=_AFP, dims=(64, 128, 256, 512)),
    "unireplknet_n": UniRepLKNetConfig(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "unireplknet_t": UniRepLKNetConfig(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640)),
    "unireplknet_s": UniRepLKNetConfig(depths=_SBLXL, dims=(96, 192, 384, 768)),
}
# The ImageNet-22K models: configs and counts only, not registered (the registry test would
# spend a tiny-model compile on each); build them with ``UniRepLKNet.from_config``.
UNIREPLKNET_LARGE_PRESETS: dict[str, UniRepLKNetConfig] = {
    "unireplknet_b": UniRepLKNetConfig(depths=_SBLXL, dims=(128, 256, 512, 1024)),
    "unireplknet_l": UniRepLKNetConfig(depths=_SBLXL, dims=(192, 384, 768, 1536)),
    "unireplknet_xl": UniRepLKNetConfig(depths=_SBLXL, dims=(256, 512, 1024, 2048)),
}


def _block_params(dim: int, kernel: int, deploy: bool) -> int:
    """Parameters of one `UniRepLKNetBlock` (official layout, ffn_factor 4, layer scale on)."""
    hidden, se = 4 * dim, dim // 4
    if kernel == 0:
        dw = 0
    elif deploy:
        dw = dim * kernel**2 + dim  # one conv with bias, its BN folded
    elif kernel >= 7:
        dw = dim * kernel**2 + 2 * dim + sum(dim * k * k + 2 * dim for k, _ in
                                             DILATED_REPARAM_BRANCHES[kernel])  # fmt: skip
        dw += 2 * dim  # norm
    else:
        dw = dim * kernel**2 + 2 * dim  # conv without bias + norm
    se_params = dim * se + se + se * dim + dim
    ffn = dim * hidden + hidden + (1 if deploy else 2) * hidden + hidden * dim
    tail = dim if deploy else 2 * dim + dim  # pwconv2 bias | BN + layer scale
    return dw + se_params + ffn + tail


def unireplknet_param_count(config: UniRepLKNetConfig, in_chans: int = 3) -> int:
    """Parameter count of a UniRepLKNet from its config in closed form (official layout;
    ``config.deploy`` selects the re-parameterised form)."""
    c0 = config.dims[0]
    n = in_chans * (c0 // 2) * 9 + c0 // 2 + 2 * (c0 // 2)  # stem conv 1 + LN
    n += (c0 // 2) * c0 * 9 + c0 + 2 * c0  # stem conv 2 + LN
    kernels = _kernel_sizes(config)
    prev = c0
    for i, dim in enumerate(config.dims):
        if i > 0:
            n += prev * dim * 9 + dim + 2 * dim  # downsample conv + LN
        n += sum(_block_params(dim, k, config.deploy) for k in kernels[i])
        prev = dim
    n += 2 * prev  # final LN
    if config.num_classes:
        n += prev * config.num_classes + config.num_classes
    return n


# sum(p.numel() for p in unireplknet_x(num_classes=1000).parameters()) of the official
# unireplknet.py (AILab-CVC/UniRepLKNet at 2016283, torch 2.14), in the train form the presets
# build; equal to the closed form `unireplknet_param_count` (the tests check both).
UNIREPLKNET_PARAMS: dict[str, int] = {
    "unireplknet_a": 4_649_060,
    "unireplknet_f": 6_489_328,
    "unireplknet_p": 11_080_520,
    "unireplknet_n": 18_818_880,
    "unireplknet_t": 31_693_420,
    "unireplknet_s": 56_456_704,
    "unireplknet_b": 99_089_416,
    "unireplknet_l": 220_076_056,
    "unireplknet_xl": 388_690_984,
}
# The same after the official reparameterize_unireplknet() (deploy form, ``deploy=True`` here):
# these are the README's rounded #params, 4.4M / 6.2M / 10.7M / 18.3M / 31M / 56M / 98M / 218M /
# 386M.
UNIREPLKNET_DEPLOY_PARAMS: dict[str, int] = {
    "unireplknet_a": 4_437_300,
    "unireplknet_f": 6_235_216,
    "unireplknet_p": 10_741_704,
    "unireplknet_n": 18_318_560,
    "unireplknet_t": 31_037_980,
    "unireplknet_s": 55_645_984,
    "unireplknet_b": 98_008_456,
    "unireplknet_l": 218_454_616,
    "unireplknet_xl": 386_529_064,
}


def _example_image(config: UniRepLKNetConfig) -> Array:
    size = 4 * 2 ** (len(config.depths) - 1)  # the smallest input every stage halves evenly
    n = 2 * size * size * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, 3)


register_presets(
    UniRepLKNet.from_config,
    UNIREPLKNET_PRESETS,
    example_input=_example_image,
    doc="The official {name} (UniRepLKNet, arXiv 2311.15599); kwargs override config fields.",
    paper=Paper(
        "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, "
        "Time-Series and Image Recognition",
        arxiv="2311.15599",
        code="https://github.com/AILab-CVC/UniRepLKNet",
    ),
    published_params={k: v for k, v in UNIREPLKNET_PARAMS.items() if k in UNIREPLKNET_PRESETS},
    params_source="official AILab-CVC/UniRepLKNet unireplknet.py (commit 2016283) run with "
    "torch: sum(p.numel() for p in model.parameters()) at num_classes=1000 in the train "
    "(unfused) form the presets build, equal to the closed form unireplknet_param_count. The "
    "README's #params (4.4M A, 6.2M F, 10.7M P, 18.3M N, 31M T, 56M S, 98M B, 218M L, 386M XL) "
    "are of the re-parameterised form: UNIREPLKNET_DEPLOY_PARAMS, checked with deploy=True",
    tiny={
        "depths": (1, 1, 2, 1),
        "dims": (16, 32, 48, 64),
        "kernel_sizes": ((3,), (7,), (13, 3), (13,)),
        "num_classes": 10,
    },
)
