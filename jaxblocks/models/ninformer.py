"""NiNformer image classifier: conv patchify → `NiNBlock` × L → mean over tokens → Linear.

Abdullah, Ozcan, "NiNformer: A Network in Network Transformer with Token Mixing Generated
Gating Function", https://arxiv.org/abs/2403.02411. Official code: Abdullah-88/NiNformer
(``ninformer.py`` for the blocks, ``train.py`` for ``NiNformerImageClassification``, whose
CIFAR-10 defaults the preset ``ninformer_cifar10`` repeats).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.ninformer import NiNBlock, torch_linear_bias_init, torch_linear_kernel_init
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["NINFORMER_PRESETS", "NiNformer", "NiNformerConfig", "ninformer_param_count"]

Dtype = Any
CONV_AXES = (None, None, "conv_in", "conv_out")
HEAD_AXES = ("embed", "classes")


@dataclasses.dataclass(frozen=True)
class NiNformerConfig:
    """Architecture of a `NiNformer` (https://arxiv.org/abs/2403.02411).

    The default is the official ``train.py``'s ``NiNformerImageClassification()`` (CIFAR-10).

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features.
      image_size: side of the square input images (fixes the number of tokens).
      patch_size: kernel and stride of the patchify convolution.
      in_channels: image channels.
      d_model: token channels.
      d_ffn: hidden width of every MLP (FFN, token and channel mixers).
      num_layers: number of `NiNBlock`.
      dropout: dropout rate of every MLP.
    """

    num_classes: int = 10
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    d_model: int = 256
    d_ffn: int = 512
    num_layers: int = 4
    dropout: float = 0.5

    def __post_init__(self):
        _validate(self)

    @property
    def seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _validate(cfg: Any) -> None:
    for name in ("image_size", "patch_size", "in_channels", "d_model", "d_ffn", "num_layers"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"NiNformer: {name}={v!r} must be a positive int")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"NiNformer: image_size={cfg.image_size} must be divisible by "
                         f"patch_size={cfg.patch_size}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"NiNformer: num_classes={cfg.num_classes} must be >= 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"NiNformer: dropout={cfg.dropout!r} must be in [0, 1)")


def ninformer_param_count(cfg: NiNformerConfig) -> int:
    """Parameters of the official ``NiNformerImageClassification`` with ``cfg``'s sizes, layer by
    layer from ``ninformer.py``/``train.py`` (each Linear/Conv with bias, each LayerNorm 2·d)."""
    d, f, n, p = cfg.d_model, cfg.d_ffn, cfg.seq_len, cfg.patch_size

    def linear(i: int, o: int) -> int:
        return i * o + o

    def ffn(dim: int, hidden: int) -> int:
        return linear(dim, hidden) + linear(hidden, dim)

    mixer = 2 * d + ffn(n, f) + 2 * d + ffn(d, f)
    block = 2 * d + linear(d, d) + mixer + ffn(d, f)  # one shared LayerNorm
    head = linear(d, cfg.num_classes) if cfg.num_classes else 0
    return cfg.in_channels * p * p * d + d + cfg.num_layers * block + head


class NiNformer(nn.Module):
    """NiNformer classifier (https://arxiv.org/abs/2403.02411).

    A non-overlapping conv patchify (kernel = stride = ``patch_size``) turns the image into
    ``(image_size / patch_size)²`` tokens, ``num_layers`` `NiNBlock` process them (no position
    embedding: the token MLPs are position-aware), the tokens are averaged and a Linear gives
    the logits. As the official model, there is no final LayerNorm before the pooling.

    Dropout is active only with ``deterministic=False`` (then pass ``rngs={"dropout": key}``).
    Initialisation follows torch's defaults, as the official code (U(±1/√fan_in) for every
    Linear/Conv weight and bias); LayerNorm ε is torch's 1e-5.

    Attributes:
      num_classes, image_size, patch_size, in_channels, d_model, d_ffn, num_layers, dropout:
        see `NiNformerConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32); param_dtype:
        parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = NiNformer(d_model=16, d_ffn=32, num_layers=1)
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> model.apply(variables, x).shape
      (2, 10)
    """

    num_classes: int = 10
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    d_model: int = 256
    d_ffn: int = 512
    num_layers: int = 4
    dropout: float = 0.5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `NiNformerConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B classes"]:
        """Logits ``[B, num_classes]`` (pooled features ``[B, d_model]`` if ``num_classes == 0``).

        Args:
          x: NHWC images of side ``image_size`` with ``in_channels`` channels.
          deterministic: disable dropout (default); False needs an rng named ``"dropout"``.
        """
        _validate(self)
        want = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"NiNformer: x must be NHWC images [batch, {want[0]}, {want[1]}, {want[2]}] "
                f"(image_size={self.image_size}, in_channels={self.in_channels}), got shape "
                f"{x.shape}"
            )
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        p = self.patch_size
        fan_in = self.in_channels * p * p
        x = nn.Conv(
            self.d_model,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(torch_linear_kernel_init, CONV_AXES),
            bias_init=nn.with_logical_partitioning(torch_linear_bias_init(fan_in), ("conv_out",)),
            name="patcher",
        )(x)  # [B, H/p, W/p, D]
        b, h, w, d = x.shape
        # Row-major over (h, w), as the official permute(0, 2, 3, 1).view(B, -1, D).
        x = x.reshape(b, h * w, d)
        for i in range(self.num_layers):
            x = NiNBlock(
                self.d_model, self.d_ffn, h * w, self.dropout,
                dtype=dtype, param_dtype=self.param_dtype, name=f"blocks_{i}",
            )(x, deterministic=deterministic)  # fmt: skip
        x = jnp.mean(x.astype(jnp.float32), axis=1).astype(dtype)  # [B, D]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(torch_linear_kernel_init, HEAD_AXES),
            bias_init=nn.with_logical_partitioning(
                torch_linear_bias_init(self.d_model), ("classes",)
            ),
            name="classifier",
        )(x)


NINFORMER_PRESETS: dict[str, NiNformerConfig] = {"ninformer_cifar10": NiNformerConfig()}


def _example_image(config: NiNformerConfig) -> Array:
    n = 2 * config.image_size * config.image_size * config.in_channels
    x = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 0.37)
    return x.reshape(2, config.image_size, config.image_size, config.in_channels)


register_presets(
    NiNformer.from_config,
    NINFORMER_PRESETS,
    example_input=_example_image,
    doc="{name}: the official NiNformer CIFAR-10 classifier; kwargs override fields.",
    paper=Paper(
        "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function",
        arxiv="2403.02411",
        code="https://github.com/Abdullah-88/NiNformer",
    ),
    published_params={"ninformer_cifar10": ninformer_param_count(NiNformerConfig())},
    params_source="computed layer by layer from the official code's architecture "
    "(Abdullah-88/NiNformer train.py NiNformerImageClassification() defaults with ninformer.py; "
    "`ninformer_param_count`); the paper and README publish no count",
    tiny={"d_model": 32, "d_ffn": 64, "num_layers": 2},
)
