"""CRAFT — Li et al., "Feature Modulation Transformer: Cross-Refinement of Global Representation
via High-Frequency Prior for Image Super-Resolution", ICCV 2023, https://arxiv.org/abs/2308.05022.
Official code: AVC2-UESTC/CRAFT-SR ``basicsr/archs/craft_arch.py`` (class ``CRAFT``).

A lightweight SwinIR-style SR transformer: Conv3×3 → residual cross-refinement groups
(`jaxblocks.blocks.craft.RCRFG`: SRWAB pairs for global context, HFERB for high frequencies,
HFB to fuse them) → LayerNorm → Conv3×3 (+ the shallow features) → one Conv3×3 to ``C·r²``
channels and `pixel_shuffle` (the official ``UpsampleOneStep``). Every preset is the released
configuration (embed 48, 4 groups of 2 units, 6 heads, 4×16 windows) at ×2, ×3, ×4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.craft import CONV_INIT, LN_EPS, RCRFG
from jaxblocks.layers.pixel_shuffle import pixel_shuffle
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["CRAFT", "CRAFTConfig", "CRAFT_PARAMS", "CRAFT_PRESETS", "RGB_MEAN"]

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean the official subtracts from RGB inputs


@dataclasses.dataclass(frozen=True)
class CRAFTConfig:
    """Architecture of a `CRAFT`; the default is the released ×2 model.

    Attributes:
      upscale: r (2, 3, 4 released; any r >= 1 works with the one-step upsampler).
      in_chans: image channels (3: RGB, the DIV2K mean is subtracted; otherwise no mean).
      embed_dim: feature width C.
      depths: CRAFT units (SRWAB pair + HFERB + HFB) per residual group.
      num_heads: heads per group (even: half per window orientation).
      split_size: the H-Rwin window (hs, ws); the V-Rwin window is its transpose.
      mlp_ratio: SRWAB MLP width over C.
      ffn_expansion_factor: HFB GDFN width over C.
      img_range: inputs are scaled by it after the mean is subtracted (1: images in [0, 1]).
      pad_to_window: pad inputs whose H or W is not a multiple of ``lcm(split_size)`` by
        mirroring (as the official inference script) and crop the output; False raises instead.
    """

    upscale: int = 2
    in_chans: int = 3
    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    split_size: tuple[int, int] = (4, 16)
    mlp_ratio: float = 2.0
    ffn_expansion_factor: float = 2.66
    img_range: float = 1.0
    pad_to_window: bool = True

    def __post_init__(self):
        if isinstance(self.upscale, bool) or not isinstance(self.upscale, int) or self.upscale < 1:
            raise ValueError(f"CRAFTConfig.upscale must be a positive int, got {self.upscale!r}")
        if self.in_chans < 1:
            raise ValueError(f"CRAFTConfig.in_chans must be >= 1, got {self.in_chans}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"CRAFTConfig: depths {self.depths} and num_heads {self.num_heads} need one entry "
                f"per group"
            )
        if len(self.split_size) != 2 or min(self.split_size) < 1:
            raise ValueError(f"CRAFTConfig.split_size must be two positive ints, got "
                             f"{self.split_size}")  # fmt: skip
        c = self.embed_dim
        if c % 2 or c // 32 < 1:
            raise ValueError(f"CRAFTConfig.embed_dim must be even and >= 32, got {c}")
        for h in self.num_heads:
            if h % 2 or (c // 2) % (h // 2) or c % h:
                raise ValueError(
                    f"CRAFTConfig: num_heads {self.num_heads} must be even and divide "
                    f"embed_dim={c} (and embed_dim/2 by heads/2)"
                )


class CRAFT(nn.Module):
    """Cross-refinement adaptive feature modulation transformer (https://arxiv.org/abs/2308.05022):
    low-resolution ``[B, H, W, C]`` image → ``[B, rH, rW, C]``.

    As the official: ``x = (x − mean)·img_range``; ``f = conv_first(x)``;
    ``f = conv_after_body(LN(RCRFG…(f))) + f``; ``y = pixel_shuffle(upsample(f), r)``;
    ``y / img_range + mean``. The attention windows need H, W multiples of
    ``lcm(split_size)`` (16); other sizes are mirror-padded to the next multiple and the output
    cropped (the official inference script pads by one extra window even when divisible — here
    nothing is padded then, so divisible inputs match the official module exactly).

    Attributes:
      see `CRAFTConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> model = CRAFT(upscale=2, embed_dim=32, depths=(1,), num_heads=(2,), split_size=(2, 4))
      >>> lr = jnp.ones((1, 6, 6, 3))
      >>> model.apply(model.init(jax.random.key(0), lr), lr).shape
      (1, 12, 12, 3)
    """

    upscale: int = 2
    in_chans: int = 3
    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    split_size: tuple[int, int] = (4, 16)
    mlp_ratio: float = 2.0
    ffn_expansion_factor: float = 2.66
    img_range: float = 1.0
    pad_to_window: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # Build from a `CRAFTConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    def _config(self) -> CRAFTConfig:
        return CRAFTConfig(self.upscale, self.in_chans, self.embed_dim, tuple(self.depths),
                           tuple(self.num_heads), tuple(self.split_size), self.mlp_ratio,
                           self.ffn_expansion_factor, self.img_range,
                           self.pad_to_window)  # fmt: skip

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B Hr Wr C"]:
        cfg = self._config()
        if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
            raise ValueError(
                f"CRAFT: x must be NHWC with {cfg.in_chans} channel(s), got shape {x.shape}"
            )
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        _, h, w, _ = x.shape
        m = math.lcm(*cfg.split_size)
        ph, pw = -h % m, -w % m
        if (ph or pw) and not cfg.pad_to_window:
            raise ValueError(
                f"CRAFT: x of shape {x.shape}: H and W must be multiples of {m} "
                f"(split_size {cfg.split_size}) when pad_to_window=False"
            )
        mean = jnp.asarray(RGB_MEAN if cfg.in_chans == 3 else (0.0,) * cfg.in_chans, dtype)
        mean = mean.reshape(1, 1, 1, cfg.in_chans)
        x = (x.astype(dtype) - mean) * cfg.img_range
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")
        c = cfg.embed_dim
        f = nn.Conv(c, (3, 3), padding=1, kernel_init=CONV_INIT, name="conv_first", **kw)(x)
        y = f
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            y = RCRFG(c, depth, heads, cfg.split_size, cfg.mlp_ratio,
                      ffn_expansion_factor=cfg.ffn_expansion_factor, name=f"layers_{i}",
                      **kw)(y)  # fmt: skip
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm", **kw)(y)
        y = nn.Conv(c, (3, 3), padding=1, kernel_init=CONV_INIT, name="conv_after_body",
                    **kw)(y)  # fmt: skip
        f = f + y
        r = cfg.upscale
        y = nn.Conv(cfg.in_chans * r * r, (3, 3), padding=1, kernel_init=CONV_INIT,
                    name="upsample", **kw)(f)  # fmt: skip
        y = pixel_shuffle(y, r)[:, : h * r, : w * r]
        return y / cfg.img_range + mean


CRAFT_PRESETS: dict[str, CRAFTConfig] = {
    "craft_x2": CRAFTConfig(upscale=2),
    "craft_x3": CRAFTConfig(upscale=3),
    "craft_x4": CRAFTConfig(upscale=4),
}

# Exact sums of numel() of the official torch module (RGB, the released configuration); the
# README rounds them to 737K / 744K / 753K.
CRAFT_PARAMS = {"craft_x2": 737_756, "craft_x3": 744_251, "craft_x4": 753_344}


def _example_image(config: CRAFTConfig) -> Array:
    s = math.lcm(*config.split_size)
    n = 2 * s * s * config.in_chans
    return jnp.linspace(0.0, 1.0, n, dtype=jnp.float32).reshape(2, s, s, config.in_chans)


register_presets(
    CRAFT.from_config,
    CRAFT_PRESETS,
    example_input=_example_image,
    doc="{name}: the released lightweight CRAFT (RGB, embed 48, depths 2×4, 4×16 windows); "
    "kwargs override config fields.",
    paper=Paper(
        "Feature Modulation Transformer: Cross-Refinement of Global Representation via "
        "High-Frequency Prior for Image Super-Resolution",
        arxiv="2308.05022",
        code="https://github.com/AVC2-UESTC/CRAFT-SR",
    ),
    published_params=CRAFT_PARAMS,
    params_source="official AVC2-UESTC/CRAFT-SR basicsr/archs/craft_arch.py CRAFT(upscale=r, "
    "in_chans=3, embed_dim=48, depths=[2]*4, num_heads=[6]*4, mlp_ratio=2) as in "
    "inference/inference_CRAFT.py: sum of numel() (the README rounds them to 737K / 744K / 753K)",
    # One shared tiny model (upscale 2 for all three) so the registry test runs it once.
    tiny={
        "upscale": 2,
        "embed_dim": 32,
        "depths": (1,),
        "num_heads": (2,),
        "split_size": (2, 4),
    },
)
