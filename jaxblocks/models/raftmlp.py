"""RaftMLP: a four-level MLP-only classifier with raft token mixing and cross-scale embeddings.

Tatsunami, Taki, "RaftMLP: How Much Can Be Done Without Attention and with Less Spatial
Locality?", https://arxiv.org/abs/2108.04384. Official code: okojoalg/raft-mlp
(``libs/models.py`` ``RaftMLP``, ``libs/modules.py`` ``SerialPermutedLevel``); the presets are
its ImageNet settings ``configs/settings/imagenet-raft-mlp-cross-mlp-emb-{s,m,l}.yaml``
(``token_mixing_type: ser_pm``, ``embedding_type: emb_cross_mlp``, ``shortcut: False``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.ninformer import torch_linear_bias_init, torch_linear_kernel_init
from jaxblocks.blocks.raftmlp import (
    ACTIVATION_AXES,
    LN_EPSILON,
    CrossScaleMLPEmbedding,
    RaftMLPBlock,
    check_embedding_kernels,
    resize_bicubic,
)
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "RAFTMLP_PRESETS",
    "RaftMLP",
    "RaftMLPConfig",
    "RaftMLPLevel",
    "level_grids",
    "raftmlp_param_count",
]

Dtype = Any
HEAD_AXES = ("embed", "classes")


@dataclasses.dataclass(frozen=True)
class RaftMLPConfig:
    """Architecture of a `RaftMLP` (https://arxiv.org/abs/2108.04384).

    The default is RaftMLP-S (``imagenet-raft-mlp-cross-mlp-emb-s.yaml``); `RAFTMLP_PRESETS`
    holds M and L, which differ only in ``dims``.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled, normalised features.
      image_size: the training resolution (the official ``pretrained_image_size``); it fixes
        each level's token grid ``ceil(image_size / Π patch_sizes[:i+1])`` and so the size of
        the token-mixing weights. Other input sizes are resized (see `RaftMLP`).
      in_channels: image channels.
      dims: channels of each level.
      depths: `RaftMLPBlock` per level.
      patch_sizes: downsampling of each level (its embedding's stride).
      raft_sizes: channels per raft in each level.
      embedding_kernels: each level's `CrossScaleMLPEmbedding` kernels, the patch size first.
      token_expansion, channel_expansion: hidden factors of the token and channel MLPs.
      dropout: dropout inside every MLP (0 in the official settings).
      drop_path: stochastic depth of every residual branch, the same rate everywhere as in the
        official code (which trains with 0.1; the presets use 0 so that training needs no rng
        unless asked).
    """

    num_classes: int = 1000
    image_size: int = 224
    in_channels: int = 3
    dims: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    patch_sizes: tuple[int, ...] = (4, 2, 2, 2)
    raft_sizes: tuple[int, ...] = (2, 2, 2, 2)
    embedding_kernels: tuple[tuple[int, ...], ...] = ((4, 8), (2, 4), (2, 4), (2,))
    token_expansion: int = 2
    channel_expansion: int = 4
    dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `RaftMLPConfig` and the `RaftMLP` attributes."""
    n = len(cfg.dims)
    for name in ("image_size", "in_channels", "token_expansion", "channel_expansion"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"RaftMLP: {name}={v!r} must be a positive int")
    if not n:
        raise ValueError("RaftMLP: dims must name at least one level")
    for name in ("dims", "depths", "patch_sizes", "raft_sizes", "embedding_kernels"):
        v = getattr(cfg, name)
        if len(v) != n:
            raise ValueError(f"RaftMLP: {name}={v!r} must have one entry per level "
                             f"(len(dims) = {n})")  # fmt: skip
    for name in ("dims", "depths", "patch_sizes", "raft_sizes"):
        v = getattr(cfg, name)
        if any(not isinstance(a, int) or isinstance(a, bool) or a < 1 for a in v):
            raise ValueError(f"RaftMLP: {name}={v!r} must be positive ints")
    for i, (dim, r, p, ks) in enumerate(
        zip(cfg.dims, cfg.raft_sizes, cfg.patch_sizes, cfg.embedding_kernels, strict=True)
    ):
        if dim % r:
            raise ValueError(f"RaftMLP: level {i}: dims[{i}]={dim} must be divisible by "
                             f"raft_sizes[{i}]={r}")  # fmt: skip
        check_embedding_kernels(f"RaftMLP: embedding_kernels[{i}]", tuple(ks))
        if ks[0] != p:
            raise ValueError(f"RaftMLP: level {i}: embedding_kernels[{i}]={tuple(ks)!r} must "
                             f"start with patch_sizes[{i}]={p}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"RaftMLP: num_classes={cfg.num_classes} must be >= 0")
    for name in ("dropout", "drop_path"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"RaftMLP: {name}={getattr(cfg, name)!r} must be in [0, 1)")


def level_grids(image_size: int, patch_sizes: tuple[int, ...]) -> list[int]:
    """Side of each level's token grid for a square input of ``image_size``: ``ceil`` of the
    size over the patch sizes so far (the official ``math.ceil(size / patch_size)`` chain)."""
    grids, size = [], image_size
    for p in patch_sizes:
        size = math.ceil(size / p)
        grids.append(size)
    return grids


def raftmlp_param_count(cfg: RaftMLPConfig) -> int:
    """Parameters of the official ``RaftMLP`` with ``cfg``'s sizes, layer by layer from
    ``libs/models.py``/``libs/modules.py`` (every Linear with bias, every LayerNorm ``2·C``)."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    def mlp(dim: int, e: int) -> int:
        return linear(dim, dim * e) + linear(dim * e, dim)

    n, cin = 0, cfg.in_channels
    grids = level_grids(cfg.image_size, cfg.patch_sizes)
    for c, d, r, ks, g in zip(cfg.dims, cfg.depths, cfg.raft_sizes, cfg.embedding_kernels,
                              grids, strict=True):  # fmt: skip
        n += linear(cin * sum(k * k for k in ks), c)
        token = 2 * (2 * c + mlp(r * g, cfg.token_expansion))  # vertical + horizontal
        n += d * (token + 2 * c + mlp(c, cfg.channel_expansion))
        cin = c
    n += 2 * cfg.dims[-1]  # head LayerNorm
    return n + (linear(cfg.dims[-1], cfg.num_classes) if cfg.num_classes else 0)


class RaftMLPLevel(nn.Module):
    """One RaftMLP level (https://arxiv.org/abs/2108.04384), the official
    ``SerialPermutedLevel``: resize to a multiple of the patch size (bicubic, only when
    needed) → `CrossScaleMLPEmbedding` → `RaftMLPBlock` × depth.

    Attributes:
      features: output channels.
      depth: number of blocks.
      grid: side of the training token grid (the mixing weights' size).
      kernels: embedding kernels (the patch size first).
      raft_size, token_expansion, channel_expansion, dropout, drop_path: of the blocks.
      dtype, param_dtype: compute and parameter dtypes.
    """

    features: int
    depth: int
    grid: int
    kernels: tuple[int, ...]
    raft_size: int = 2
    token_expansion: int = 2
    channel_expansion: int = 4
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W Ci"], *, deterministic: bool = True
    ) -> Float[Array, "B h w C"]:
        p = self.kernels[0]
        h, w = x.shape[1], x.shape[2]
        # The official Level.forward: bicubic up to the next multiple of the patch size.
        x = resize_bicubic(x, (-(-h // p) * p, -(-w // p) * p))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CrossScaleMLPEmbedding(self.features, tuple(self.kernels), name="embedding", **kw)(x)
        for j in range(self.depth):
            x = RaftMLPBlock(
                self.grid,
                self.grid,
                self.raft_size,
                self.token_expansion,
                self.channel_expansion,
                self.dropout,
                self.drop_path,
                name=f"blocks_{j}",
                **kw,
            )(x, deterministic=deterministic)
        return x


class RaftMLP(nn.Module):
    """RaftMLP classifier (Tatsunami & Taki, https://arxiv.org/abs/2108.04384).

    A hierarchical MLP-Mixer without attention or convolutions in its blocks: four levels, each
    a `CrossScaleMLPEmbedding` (patches of several sizes around each stride-``p`` cell, one
    Linear) and `RaftMLPBlock` s (vertical and horizontal raft token mixing, then channel
    mixing), then LayerNorm → global average pooling → Linear (the official ``shortcut: False``
    head). Layout and parameter count match the official ``RaftMLP`` (`raftmlp_param_count`);
    torch's default initialisation (U(±1/√fan_in) for every Linear) and LayerNorm ε 1e-5, as
    the official code, which sets no init of its own.

    Input sizes: the token-mixing weights are sized by the token grid of ``image_size``. Other
    sizes (any H, W) follow the official code: each level first resizes its input up to a
    multiple of its patch size (bicubic, when needed), and every block resizes its tokens to
    the training grid for the token mixing and back (torch's bicubic, `resize_bicubic`). The
    channel mixing and the embeddings run at the input's own grid.

    Dropout and drop path (off at the defaults) are active only with ``deterministic=False``,
    which then needs an rng named ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the levels' outputs
    ``[B, h_i, w_i, dims[i]]`` (before the head's LayerNorm) instead of the logits;
    ``num_classes=0`` returns the pooled, normalised features. (The official detection backbone
    ``DetRaftMLP`` takes its first feature map after level 0's embedding instead of after its
    blocks; here every level contributes its output.)

    Deviations: channels-last (NHWC) throughout; the token mixers' LayerNorm parameters keep the
    official raft order (`RaftLayerNorm`); the cross-scale embedding is computed as a sum of
    strided convolutions with the official ``fc`` weight (the same map as unfold → Linear).

    Attributes:
      num_classes, image_size, in_channels, dims, depths, patch_sizes, raft_sizes,
        embedding_kernels, token_expansion, channel_expansion, dropout, drop_path: see
        `RaftMLPConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax
      >>> model = RaftMLP(num_classes=10, image_size=32, dims=(8, 16), depths=(1, 1),
      ...                 patch_sizes=(4, 2), raft_sizes=(2, 2), embedding_kernels=((4, 8), (2,)))
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> model.apply(variables, x).shape
      (2, 10)
      >>> [f.shape for f in model.apply(variables, x, features=True)]
      [(2, 8, 8, 8), (2, 4, 4, 16)]
      >>> model.apply(variables, x[:, :27, :40]).shape  # other sizes are resized
      (2, 10)
    """

    num_classes: int = 1000
    image_size: int = 224
    in_channels: int = 3
    dims: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    patch_sizes: tuple[int, ...] = (4, 2, 2, 2)
    raft_sizes: tuple[int, ...] = (2, 2, 2, 2)
    embedding_kernels: tuple[tuple[int, ...], ...] = ((4, 8), (2, 4), (2, 4), (2,))
    token_expansion: int = 2
    channel_expansion: int = 4
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `RaftMLPConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features ``[B, dims[-1]]`` if ``num_classes``
        is 0, the levels' outputs if ``features``).

        Args:
          x: NHWC images with ``in_channels`` channels, any height and width (see above).
          deterministic: disable dropout and drop path (default).
          features: return the levels' outputs instead of the logits.
        """
        _validate(self)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"RaftMLP: x must be NHWC images [batch, height, width, {self.in_channels}] "
                f"(in_channels={self.in_channels}), got shape {x.shape}"
            )
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        grids = level_grids(self.image_size, tuple(self.patch_sizes))
        outputs = []
        for i, dim in enumerate(self.dims):
            x = RaftMLPLevel(
                dim,
                self.depths[i],
                grids[i],
                tuple(self.embedding_kernels[i]),
                self.raft_sizes[i],
                self.token_expansion,
                self.channel_expansion,
                self.dropout,
                self.drop_path,
                name=f"levels_{i}",
                **kw,
            )(x, deterministic=deterministic)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)
        if features:
            return tuple(outputs)
        x = nn.LayerNorm(epsilon=LN_EPSILON, name="norm", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(torch_linear_kernel_init, HEAD_AXES),
            bias_init=nn.with_logical_partitioning(
                torch_linear_bias_init(self.dims[-1]), ("classes",)
            ),
            name="classifier",
            **kw,
        )(x)


RAFTMLP_PRESETS: dict[str, RaftMLPConfig] = {
    "raftmlp_s": RaftMLPConfig(dims=(64, 128, 256, 512)),
    "raftmlp_m": RaftMLPConfig(dims=(96, 192, 384, 768)),
    "raftmlp_l": RaftMLPConfig(dims=(128, 192, 512, 1024)),
}
# The paper's Table (arXiv 2108.04384v2, ImageNet-1k): RaftMLP-S 9.9M, -M 21.4M, -L 36.2M
# parameters, rounded to 0.1M. The exact counts of the official code at these settings
# (`raftmlp_param_count`) are 9,868,768, 21,413,632 and 36,184,672.
RAFTMLP_PARAMS: dict[str, int] = {
    "raftmlp_s": 9_900_000,
    "raftmlp_m": 21_400_000,
    "raftmlp_l": 36_200_000,
}


def _example_image(config: RaftMLPConfig) -> Array:
    n = 2 * config.image_size * config.image_size * config.in_channels
    x = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 0.37)
    return x.reshape(2, config.image_size, config.image_size, config.in_channels)


register_presets(
    RaftMLP.from_config,
    RAFTMLP_PRESETS,
    example_input=_example_image,
    doc="{name}: RaftMLP ImageNet preset (official imagenet-raft-mlp-cross-mlp-emb settings); "
    "kwargs override config fields and module attributes.",
    paper=Paper(
        "RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?",
        arxiv="2108.04384",
        code="https://github.com/okojoalg/raft-mlp",
    ),
    published_params=RAFTMLP_PARAMS,
    params_source="the paper's ImageNet table (arXiv 2108.04384): RaftMLP-S 9.9M, RaftMLP-M "
    "21.4M, RaftMLP-L 36.2M, rounded to 0.1M (hence params_rtol); the official code at the "
    "imagenet-raft-mlp-cross-mlp-emb-{s,m,l} settings has exactly 9,868,768 / 21,413,632 / "
    "36,184,672 (`raftmlp_param_count`)",
    params_rtol=0.005,
    tiny={
        "image_size": 32,
        "num_classes": 10,
        "dims": (8, 16, 16, 24),
        "depths": (1, 1, 1, 1),
    },
)
