"""SLAB full models: SLAB-DeiT, SLAB-PVT and SLAB-Swin.

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582.
Official code: xinghaochen/SLAB ``classification/models/slab_deit.py``
(``deit_{tiny,small}_patch16_224_linear_repbn``), ``slab_pvt.py`` (``slab_pvt_tiny``) and
``slab_swin.py`` (``SlabSwinTransformer`` with ``cfgs/slab_swin_t.yaml``). This file registers
``slab_deit_tiny``, ``slab_deit_small``, ``slab_pvt_tiny`` and ``slab_swin_tiny``.

Every norm is a `PRepBN` (LayerNorm → RepBN during training); `fold_slab_model` folds each
inference RepBN into the Dense or conv next to it, and the model with ``deploy=True`` runs the
folded variables without any norm.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.slab import (
    SLABBlock,
    SLABPVTBlock,
    SLABSwinBlock,
    fold_repbn_into_conv_output,
    fold_slab_block,
    fold_slab_pvt_block,
    fold_slab_swin_block,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.layers.norm import PRepBN, fold_repbn_into_dense
from jaxblocks.layers.norm.repbn import repbn_affine
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "SLAB_PARAMS",
    "SLABDeiT",
    "SLABDeiTConfig",
    "SLABPVT",
    "SLABPVTConfig",
    "SLABSwin",
    "SLABSwinConfig",
    "fold_slab_model",
]

Dtype = Any
_trunc = nn.initializers.truncated_normal(0.02)


def _check_image(who: str, x: Array, in_chans: int, stride: int) -> int:
    """Validate an NHWC square image whose side is a multiple of ``stride``; return the side."""
    if x.ndim != 4 or x.shape[-1] != in_chans or x.shape[1] != x.shape[2] or x.shape[1] % stride:
        raise ValueError(
            f"{who}: x must be a square NHWC image [B, S, S, {in_chans}] (in_chans={in_chans}) "
            f"with S a multiple of the total stride {stride}, got shape {x.shape} dtype {x.dtype}"
        )
    return x.shape[1]


def _check_param(module: nn.Module, path: tuple[str, ...], shape: tuple, side: int) -> None:
    """After init, the input must give the token grid the parameters were built for."""
    if module.is_initializing() or not module.has_variable("params", path[0]):
        return
    leaf = module.variables["params"]
    for key in path:
        if key not in leaf:
            return
        leaf = leaf[key]
    if tuple(leaf.shape) != tuple(shape):
        raise ValueError(
            f"{type(module).__name__}: an input of side {side} (img_size) needs params "
            f"{'/'.join(path)} of shape {tuple(shape)}, but the variables hold "
            f"{tuple(leaf.shape)}: the positional encodings fix the image size at init"
        )


def _input(module: nn.Module, x: Array) -> tuple[Array, Any]:
    dtype = module.dtype
    if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
        dtype = jnp.float32
    return (x.astype(dtype) if dtype is not None else x), (dtype or x.dtype)


def _prepbn(steps: int, eps: float):
    return functools.partial(PRepBN, total_steps=steps, ln_epsilon=eps)


class _Affine(nn.Module):
    """Per-channel ``a·x + b``: a folded final norm when there is no head to fold it into."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        a = self.param("a", nn.initializers.ones, (c,), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (c,), jnp.float32)
        shape = (1,) * (x.ndim - 1) + (c,)
        return (x.astype(jnp.float32) * a.reshape(shape) + b.reshape(shape)).astype(x.dtype)


def _final_norm_and_head(module, x, dtype, train, step, norm_factory) -> Array:
    """Final PRepBN (if ``norm_factory``) → token mean → Linear head (deploy: folded)."""
    kw = dict(dtype=dtype, param_dtype=module.param_dtype)
    if norm_factory is not None:
        if not module.deploy:
            skw = {} if step is None else {"step": step}
            x = norm_factory(name="norm", **kw)(x, use_running_average=not train, **skw)
        elif module.num_classes == 0:
            x = _Affine(name="norm")(x)
    x = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)  # [B, C]
    if module.num_classes == 0:
        return x
    return nn.Dense(module.num_classes, kernel_init=_trunc, name="head", **kw)(x)


class _PatchEmbed(nn.Module):
    """Conv ``p×p`` stride ``p`` → tokens ``[B, N, C]`` → optional norm (official PatchEmbed)."""

    features: int
    patch: int
    norm: Any = None
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, step=None):
        p = self.patch
        y = nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", name="proj",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)  # fmt: skip
        b, h, w, c = y.shape
        y = y.reshape(b, h * w, c)
        if self.norm is not None and not self.deploy:
            skw = {} if step is None else {"step": step}
            y = self.norm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(
                y, use_running_average=not train, **skw
            )
        return y, (h, w)


# --------------------------------------------------------------------------- DeiT


@dataclasses.dataclass(frozen=True)
class SLABDeiTConfig:
    """Architecture of a `SLABDeiT` (official ``deit_*_patch16_224_linear_repbn``).

    Attributes:
      num_classes: classifier outputs (0: pooled features).
      img_size: the input side the preset is defined for (224; its example input and
        parameter count). The parameters take their shapes from the image given at init (the
        official constructor's ``img_size``); a later input of another size raises.
      patch_size, in_chans: patch side and input channels.
      embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT layout (DeiT-T 192/12/3, S 384/12/6).
      kernel_size: SLA's DWC kernel (5).
      prepbn_steps: PRepBN schedule (60k).
      ln_epsilon: PRepBN's LayerNorm ε (1e-6, ``partial(nn.LayerNorm, eps=1e-6)``).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 60000
    ln_epsilon: float = 1e-6


class SLABDeiT(nn.Module):
    """SLAB-DeiT (Guo et al. 2024, https://arxiv.org/abs/2405.11582).

    DeiT with `SLABBlock` s (simplified linear attention with a 5×5 DWC on V, `PRepBN` norms):
    patch embedding (conv 16×16 s16) + learned positional embedding (no class token) → blocks
    → final PRepBN → token mean → Linear. Official ``slab_deit.py``; its constructor also builds
    a ``cls_token`` that the forward never reads — left out here, so our count is the official
    ``sum(numel)`` minus ``embed_dim`` (see `SLAB_PARAMS`). Dropout / drop path (0 in the SLAB
    configs) are omitted; Dense layers use Flax's default init (official: trunc-normal 0.02,
    kept for the positional embedding and the head).

    ``train`` as every BatchNorm model (`resolve_train`); ``step`` drives PRepBN's λ from the
    optimizer step (default: each norm's own counter). ``features=True`` returns
    ``(tokens [B, h, w, C],)`` before the final norm. ``deploy=True`` runs the variables of
    `fold_slab_model` (no norms).

    Attributes:
      see `SLABDeiTConfig`; deploy, dtype, param_dtype.

    Example:
      >>> m = SLABDeiT(num_classes=10, img_size=32, patch_size=8, embed_dim=24, depth=1)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> v = m.init(jax.random.key(0), x)
      >>> m.apply(v, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 60000
    ln_epsilon: float = 1e-6
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        *,
        train: bool | None = None,
        step: Array | int | None = None,
        features: bool = False,
    ):
        train = False if self.deploy else resolve_train(self, train)
        side = _check_image("SLABDeiT", x, self.in_chans, self.patch_size)
        g = side // self.patch_size
        _check_param(self, ("pos_embed",), (g * g, self.embed_dim), side)
        x, dtype = _input(self, x)
        norm = _prepbn(self.prepbn_steps, self.ln_epsilon)
        x, (h, w) = _PatchEmbed(self.embed_dim, self.patch_size, None, self.deploy, dtype,
                                self.param_dtype, name="patch_embed")(x, train=train)  # fmt: skip
        pos = self.param("pos_embed", _trunc, (h * w, self.embed_dim), self.param_dtype)
        x = x + pos[None].astype(x.dtype)
        for i in range(self.depth):
            x = SLABBlock(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                kernel_size=self.kernel_size,
                norm=norm,
                ln_epsilon=self.ln_epsilon,
                deploy=self.deploy,
                dtype=dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, (h, w), train=train, step=step)
        if features:
            return (x.reshape(x.shape[0], h, w, -1),)
        return _final_norm_and_head(self, x, dtype, train, step, norm)


# --------------------------------------------------------------------------- PVT


@dataclasses.dataclass(frozen=True)
class SLABPVTConfig:
    """Architecture of a `SLABPVT` (official ``slab_pvt.py``, ``cfgs/slab_pvt_t.yaml``).

    Attributes:
      num_classes, img_size, patch_size, in_chans: as `SLABDeiTConfig` (patch 4; square
        inputs, the official DWC reshape needs a square grid).
      embed_dims, num_heads, mlp_ratios, depths: per stage (PVT-T: 64/128/320/512, 1/2/5/8,
        8/8/4/4, 2/2/2/2).
      sr_ratios: SLA's spatial reduction per stage. The SLAB-PVT config leaves
        ``PVT_LA_SR_RATIOS`` at its default ``1111`` (no reduction, used here); the
        ``PyramidVisionTransformer`` constructor's own default is ``'8421'`` (PVT's layout;
        ``sr_ratios=(8, 4, 2, 1)`` builds it).
      qkv_bias, kernel_size: official values (True, 5).
      prepbn_steps: 300000 (``LinearNorm``'s default; slab_pvt.py does not set it).
      ln_epsilon: 1e-6.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (1, 1, 1, 1)
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 300000
    ln_epsilon: float = 1e-6


class SLABPVT(nn.Module):
    """SLAB-PVT (Guo et al. 2024, https://arxiv.org/abs/2405.11582).

    PVT (v1) with `SLABPVTBlock` s: four stages of patch embedding (conv p×p s p + PRepBN) +
    learned positional embedding + blocks of PVT-style SLA (separate q / kv projections,
    optional strided spatial reduction of keys and values, DWC on V) and MLP; no final norm
    (commented out in the official code); token mean of the last stage → Linear. Official
    ``slab_pvt.py`` with ``cfgs/slab_pvt_t.yaml``; parameter names follow it
    (``patch_embed1``, ``pos_embed1``, ``block1_0``, ``head``). Deviations as `SLABDeiT`
    (no dropout / drop path; Flax Dense init).

    ``features=True`` returns the four stage outputs ``[B, H/4, W/4, C1]`` …
    ``[B, H/32, W/32, C4]``. ``train``, ``step``, ``deploy``: as `SLABDeiT`.

    Attributes:
      see `SLABPVTConfig`; deploy, dtype, param_dtype.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (1, 1, 1, 1)
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 300000
    ln_epsilon: float = 1e-6
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        *,
        train: bool | None = None,
        step: Array | int | None = None,
        features: bool = False,
    ):
        train = False if self.deploy else resolve_train(self, train)
        n = len(self.depths)
        for name in ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SLABPVT: {name} must have {n} entries (one per stage), "
                                 f"got {getattr(self, name)!r}")  # fmt: skip
        side = _check_image("SLABPVT", x, self.in_chans, self.patch_size * 2 ** (n - 1))
        g = side // self.patch_size
        _check_param(self, ("pos_embed1",), (g * g, self.embed_dims[0]), side)
        x, dtype = _input(self, x)
        norm = _prepbn(self.prepbn_steps, self.ln_epsilon)
        b = x.shape[0]
        outputs = []
        for i in range(n):
            c = self.embed_dims[i]
            x, (h, w) = _PatchEmbed(c, self.patch_size if i == 0 else 2, norm, self.deploy, dtype,
                                    self.param_dtype, name=f"patch_embed{i + 1}")(
                x, train=train, step=step)  # fmt: skip
            pos = self.param(f"pos_embed{i + 1}", _trunc, (h * w, c), self.param_dtype)
            x = x + pos[None].astype(x.dtype)
            for j in range(self.depths[i]):
                x = SLABPVTBlock(
                    num_heads=self.num_heads[i],
                    sr_ratio=self.sr_ratios[i],
                    mlp_ratio=self.mlp_ratios[i],
                    qkv_bias=self.qkv_bias,
                    kernel_size=self.kernel_size,
                    norm=norm,
                    ln_epsilon=self.ln_epsilon,
                    deploy=self.deploy,
                    dtype=dtype,
                    param_dtype=self.param_dtype,
                    name=f"block{i + 1}_{j}",
                )(x, (h, w), train=train, step=step)
            outputs.append(x.reshape(b, h, w, c))
            if i != n - 1:
                x = outputs[-1]
        if features:
            return tuple(outputs)
        return _final_norm_and_head(self, x, dtype, train, step, None)


# --------------------------------------------------------------------------- Swin


class _PatchMerging(nn.Module):
    """Swin patch merging: 2×2 neighbours concatenated (official order) → norm(4C) → Dense(2C,
    no bias; deploy: with the folded bias)."""

    norm: Any
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool, step=None):
        b, h, w, c = x.shape
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        ).reshape(b, -1, 4 * c)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if not self.deploy:
            skw = {} if step is None else {"step": step}
            x = self.norm(name="norm", **kw)(x, use_running_average=not train, **skw)
        return nn.Dense(2 * c, use_bias=self.deploy, name="reduction", **kw)(x)


@dataclasses.dataclass(frozen=True)
class SLABSwinConfig:
    """Architecture of a `SLABSwin` (official ``SlabSwinTransformer``, ``cfgs/slab_swin_t.yaml``).

    Attributes:
      num_classes, img_size, patch_size, in_chans: as `SLABDeiTConfig` (patch 4); the
        resolution also sets the window layout (`SLABSwin.block_layout`).
      embed_dim, depths, num_heads, mlp_ratio, qkv_bias: Swin-T layout.
      window_size: SLA window (SLAB-Swin-T: 56, i.e. the whole stage-1 map; at 224 every SLA
        block is global and unshifted by the official `effective_window` rule).
      attn_type: one letter per stage, ``L`` (SLA) or ``S`` (softmax window attention with
        window 7, or 12 when ``window_size > 56``); SLAB-Swin-T: ``"LLSS"``.
      kernel_size: SLA's DWC kernel (5).
      prepbn_steps: 60000 (``slab_swin.py`` ``linearnorm``).
      ln_epsilon: 1e-5 (``nn.LayerNorm`` default).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 56
    attn_type: str = "LLSS"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 60000
    ln_epsilon: float = 1e-5


class SLABSwin(nn.Module):
    """SLAB-Swin (Guo et al. 2024, https://arxiv.org/abs/2405.11582).

    Swin Transformer with `PRepBN` everywhere (patch-embedding norm, block norms, patch-merging
    norm, final norm) and `SLABSwinBlock` s whose token mixer is SLA inside (shifted) windows in
    the stages marked ``L`` and Swin's softmax window attention in those marked ``S``
    (`block_layout` lists them). Official ``slab_swin.py``: per stage, a block's window is
    ``window_size`` for SLA and 7 (12 if ``window_size > 56``) for softmax; odd blocks shift by
    half their window; then the map-size rule of `effective_window`. For SLAB-Swin-T at 224:
    stages 1–2 SLA over the whole 56×56 / 28×28 map, stage 3 softmax in 7×7 windows with
    shifts, stage 4 softmax over the 7×7 map. Deviations as `SLABDeiT`.

    ``features=True`` returns the four stage outputs (before patch merging / the final norm),
    ``[B, H/4, W/4, C]`` … ``[B, H/32, W/32, 8C]``. ``train``, ``step``, ``deploy``: as
    `SLABDeiT`.

    Attributes:
      see `SLABSwinConfig`; deploy, dtype, param_dtype.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 56
    attn_type: str = "LLSS"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    prepbn_steps: int = 60000
    ln_epsilon: float = 1e-5
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    def block_layout(self, img_size: int | None = None) -> list[list[tuple[str, int, int]]]:
        """Per stage, per block: ``(attn_type, window, shift)`` after the official rules, for
        an input of side ``img_size`` (default: the config's)."""
        n = len(self.depths)
        if len(self.attn_type) != n or set(self.attn_type) - {"L", "S"}:
            raise ValueError(f"SLABSwin: attn_type={self.attn_type!r} must hold one of 'L'/'S' "
                             f"per stage ({n} stages)")  # fmt: skip
        side = (img_size or self.img_size) // self.patch_size
        softmax_window = 7 if self.window_size <= 56 else 12
        layout = []
        for i in range(n):
            res = (side // 2**i, side // 2**i)
            stage = []
            for j in range(self.depths[i]):
                kind = self.attn_type[i]
                win = self.window_size if kind == "L" else softmax_window
                shift = 0 if j % 2 == 0 else win // 2
                win, shift = (min(res), 0) if min(res) <= win else (win, shift)
                stage.append((kind, win, shift))
            layout.append(stage)
        return layout

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        *,
        train: bool | None = None,
        step: Array | int | None = None,
        features: bool = False,
    ):
        train = False if self.deploy else resolve_train(self, train)
        n = len(self.depths)
        if len(self.num_heads) != n:
            raise ValueError(f"SLABSwin: num_heads={self.num_heads!r} must have {n} entries")
        side = _check_image("SLABSwin", x, self.in_chans, self.patch_size * 2 ** (n - 1))
        layout = self.block_layout(side)
        for i, stage in enumerate(layout):
            for j, (kind, win, _) in enumerate(stage):
                c = self.embed_dim * 2**i
                path, shape = (
                    (("attn", "pos_emb"), (win * win, c))
                    if kind == "L"
                    else (("attn", "relative_position_bias_table"), ((2 * win - 1) ** 2,
                                                                     self.num_heads[i]))
                )  # fmt: skip
                _check_param(self, (f"layers{i}_blocks{j}", *path), shape, side)
        x, dtype = _input(self, x)
        norm = _prepbn(self.prepbn_steps, self.ln_epsilon)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        x, (h, w) = _PatchEmbed(self.embed_dim, self.patch_size, norm, self.deploy,
                                name="patch_embed", **kw)(x, train=train, step=step)  # fmt: skip
        outputs = []
        for i in range(n):
            c = self.embed_dim * 2**i
            for j, (kind, win, shift) in enumerate(layout[i]):
                x = SLABSwinBlock(
                    num_heads=self.num_heads[i],
                    input_resolution=(h, w),
                    window_size=win,
                    shift_size=shift,
                    attn_type=kind,
                    mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias,
                    kernel_size=self.kernel_size,
                    norm=norm,
                    ln_epsilon=self.ln_epsilon,
                    deploy=self.deploy,
                    name=f"layers{i}_blocks{j}",
                    **kw,
                )(x, train=train, step=step)
            outputs.append(x.reshape(x.shape[0], h, w, c))
            if i != n - 1:
                x = _PatchMerging(norm, self.deploy, name=f"layers{i}_downsample", **kw)(
                    outputs[-1], train=train, step=step
                )
                h, w = h // 2, w // 2
        if features:
            return tuple(outputs)
        return _final_norm_and_head(self, x, dtype, train, step, norm)


# --------------------------------------------------------------------------- deploy fold


def _sub(variables: dict, name: str) -> dict:
    return {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}


def _repbn_of(sub: dict, name: str) -> dict:
    """The RepBN variables of the PRepBN ``name`` inside ``sub`` (params + batch_stats)."""
    return {
        "params": sub["params"][name]["repbn"],
        "batch_stats": sub["batch_stats"][name]["repbn"],
    }


def _fold_patch_embed(variables: dict, name: str, eps: float) -> dict:
    sub = _sub(variables, name)
    return {"proj": fold_repbn_into_conv_output(_repbn_of(sub, "norm"), sub["params"]["proj"], eps)}


def _fold_final_norm(variables: dict, params: dict, num_classes: int, eps: float) -> None:
    rep = _repbn_of(variables, "norm")
    if num_classes:
        # head(mean(a·x + b)) = head'(mean(x)): the affine commutes with the token mean.
        params["head"] = fold_repbn_into_dense(rep, params["head"], eps)
        del params["norm"]
    else:
        a, b = repbn_affine(rep, eps)
        params["norm"] = {"a": a, "b": b}


def fold_slab_model(variables: dict, model: nn.Module, epsilon: float = 1e-5) -> dict:
    """Fold every inference RepBN of a trained `SLABDeiT` / `SLABPVT` / `SLABSwin` into the
    Dense or conv next to it — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    Block norms go into the qkv / q, kv / fc1 Dense layers (`fold_slab_block`,
    `fold_slab_swin_block`, `fold_slab_pvt_block`), patch-embedding norms into the conv before
    them, patch-merging norms into ``reduction``, the final norm into ``head`` (or, with
    ``num_classes=0``, a stored per-channel affine). Returns ``{"params": ...}`` for
    ``model.clone(deploy=True)``, whose eval output equals the trained model's ``train=False``
    output up to rounding. ``epsilon``: the RepBN ε (1e-5 in every SLAB model).
    """
    params = dict(variables["params"])
    if isinstance(model, SLABDeiT):
        for i in range(model.depth):
            name = f"blocks_{i}"
            params[name] = fold_slab_block(_sub(variables, name), epsilon)["params"]
        _fold_final_norm(variables, params, model.num_classes, epsilon)
    elif isinstance(model, SLABPVT):
        for i, depth in enumerate(model.depths):
            name = f"patch_embed{i + 1}"
            params[name] = _fold_patch_embed(variables, name, epsilon)
            for j in range(depth):
                name = f"block{i + 1}_{j}"
                params[name] = fold_slab_pvt_block(_sub(variables, name), epsilon)["params"]
    elif isinstance(model, SLABSwin):
        params["patch_embed"] = _fold_patch_embed(variables, "patch_embed", epsilon)
        for i, depth in enumerate(model.depths):
            for j in range(depth):
                name = f"layers{i}_blocks{j}"
                params[name] = fold_slab_swin_block(_sub(variables, name), epsilon)["params"]
            name = f"layers{i}_downsample"
            if name in params:
                sub = _sub(variables, name)
                rep = _repbn_of(sub, "norm")
                params[name] = {
                    "reduction": fold_repbn_into_dense(rep, sub["params"]["reduction"], epsilon)
                }
        _fold_final_norm(variables, params, model.num_classes, epsilon)
    else:
        raise TypeError(f"fold_slab_model: model must be SLABDeiT, SLABPVT or SLABSwin, got "
                        f"{type(model).__name__}")  # fmt: skip
    return {"params": params}


# --------------------------------------------------------------------------- registry

SLAB_PRESETS: dict[str, Any] = {
    "slab_deit_tiny": SLABDeiTConfig(),
    "slab_deit_small": SLABDeiTConfig(embed_dim=384, num_heads=6),
    "slab_pvt_tiny": SLABPVTConfig(),
    "slab_swin_tiny": SLABSwinConfig(),
}

# sum(p.numel() for p in model.parameters()) of the official models (num_classes=1000), counted
# with torch from xinghaochen/SLAB classification/models: deit_tiny_patch16_224_linear_repbn
# 6,198,401 and deit_small_… 22,992,641 (both minus the unused cls_token: 192 / 384);
# slab_pvt_tiny(la_sr_ratios='1111') (the cfgs/slab_pvt_t.yaml model) 12,157,692 (the
# constructor default '8421' gives 13,353,218); SlabSwinTransformer(window_size=56,
# attn_type='LLSS', Swin-T) 29,216,605.
SLAB_PARAMS: dict[str, int] = {
    "slab_deit_tiny": 6_198_401 - 192,
    "slab_deit_small": 22_992_641 - 384,
    "slab_pvt_tiny": 12_157_692,
    "slab_swin_tiny": 29_216_605,
}

_PAPER = Paper(
    "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
    "Re-parameterized Batch Normalization",
    arxiv="2405.11582",
    code="https://github.com/xinghaochen/SLAB",
)
_SOURCE = (
    "sum of numel() over the parameters of the official xinghaochen/SLAB models "
    "(classification/models/slab_deit.py deit_{tiny,small}_patch16_224_linear_repbn, "
    "slab_pvt.py slab_pvt_tiny with cfgs/slab_pvt_t.yaml (la_sr_ratios 1111), slab_swin.py "
    "SlabSwinTransformer with cfgs/slab_swin_t.yaml), num_classes=1000, counted with torch; "
    "the DeiT counts exclude the official cls_token, which the forward never uses"
)


def _example_image(config: Any) -> Array:
    n = 2 * config.img_size**2 * config.in_chans
    x = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    return x.reshape(2, config.img_size, config.img_size, config.in_chans)


_DOC = "The official {name} (SLAB, arXiv 2405.11582); kwargs override config fields."

register_presets(
    SLABDeiT.from_config,
    {k: SLAB_PRESETS[k] for k in ("slab_deit_tiny", "slab_deit_small")},
    example_input=_example_image,
    doc=_DOC,
    paper=_PAPER,
    published_params={k: SLAB_PARAMS[k] for k in ("slab_deit_tiny", "slab_deit_small")},
    params_source=_SOURCE,
    tiny={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 24,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 10,
    },  # fmt: skip
)
register_presets(
    SLABPVT.from_config,
    {"slab_pvt_tiny": SLAB_PRESETS["slab_pvt_tiny"]},
    example_input=_example_image,
    doc=_DOC,
    paper=_PAPER,
    published_params={"slab_pvt_tiny": SLAB_PARAMS["slab_pvt_tiny"]},
    params_source=_SOURCE,
    tiny={
        "img_size": 32,
        "embed_dims": (8, 16, 24, 32),
        "num_heads": (1, 2, 3, 4),
        "depths": (1, 1, 1, 1),
        "sr_ratios": (2, 1, 1, 1),
        "num_classes": 10,
    },  # fmt: skip
)
register_presets(
    SLABSwin.from_config,
    {"slab_swin_tiny": SLAB_PRESETS["slab_swin_tiny"]},
    example_input=_example_image,
    doc=_DOC,
    paper=_PAPER,
    published_params={"slab_swin_tiny": SLAB_PARAMS["slab_swin_tiny"]},
    params_source=_SOURCE,
    tiny={
        "img_size": 32,
        "embed_dim": 8,
        "depths": (2, 2, 2, 2),
        "num_heads": (1, 2, 2, 4),
        "window_size": 4,
        "num_classes": 10,
    },  # fmt: skip
)
