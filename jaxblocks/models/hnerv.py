"""HNeRV — Chen et al., "HNeRV: A Hybrid Neural Representation for Videos", CVPR 2023,
https://arxiv.org/abs/2304.02633 (official code: haochen-rye/HNeRV ``model_all.py``,
``train_nerv_all.py``, ``hnerv_utils.py``) — and NeRV++ — Ghorbel et al., "NeRV++: An Enhanced
Implicit Neural Video Representation", https://arxiv.org/abs/2402.18305 (no code released).

A video is stored as a network fitted to its frames: a ConvNeXt encoder maps each frame to a
tiny embedding (16 × h × w; HNeRV's "hybrid", content-adaptive input), a 1×1 conv widens it to
``fc_dim·fc²`` channels that are pixel-shuffled to the first feature map, and upsampling blocks
decode it to the frame, ``(tanh(·) + 1) / 2`` at the end. What is *stored* is the quantised
embeddings (6 bit) plus the decoder weights (8 bit); the encoder is thrown away after fitting.

* `HNeRV`: decoder blocks are `jaxblocks.blocks.hnerv.NeRVBlock` (Conv k×k → PixelShuffle →
  GELU) with kernels growing 1, 3, 5, 5, 5 and widths shrinking by 1.2 per stage.
* `NeRVPlusPlus`: each block is `jaxblocks.blocks.hnerv.NeRVPlusPlusBlock` (separable-conv
  residual blocks around the upsampling block, plus a bilinear skip). NeRV++ itself builds on
  NeRV's frame-index input; here it shares HNeRV's encoder so the two decoders can be compared
  on the same embeddings at equal parameter count (a deliberate deviation).

`quantize_embedding` / `dequantize_embedding` follow the official ``quant_tensor`` per-tensor
branch; `bits_per_pixel` / `video_bpp` count the stored bits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.hnerv import (
    CONV_INIT,
    HNeRVEncoder,
    NeRVBlock,
    NeRVPlusPlusBlock,
    nerv_kernel_size,
    nerv_widths,
)
from jaxblocks.layers.pixel_shuffle import pixel_shuffle
from jaxblocks.registry import Paper, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "HNERV_PARAMS",
    "HNERV_PRESETS",
    "HNeRV",
    "HNeRVConfig",
    "NeRVPlusPlus",
    "QuantizedTensor",
    "bits_per_pixel",
    "decoder_param_count",
    "dequantize_embedding",
    "evaluate_video",
    "quantize_decoder_params",
    "quantize_embedding",
    "solve_fc_dim",
    "video_bpp",
]

OUT_ACTS = ("tanh", "sigmoid", "none")
BLOCKS = ("nerv", "nervpp")


@dataclasses.dataclass(frozen=True)
class HNeRVConfig:
    """Architecture of an `HNeRV` / `NeRVPlusPlus`; the default is the README's 1.5M Bunny model
    (``--enc_strds 5 4 4 2 2 --enc_dim 64_16 --dec_strds 5 4 4 2 2 --ks 0_1_5 --reduce 1.2
    --lower_width 12 --modelsize 1.5``, 640×1280 frames; fc_dim 68 as `solve_fc_dim` gives).

    Attributes:
      frame_size: (H, W) of the frames (only the example input reads it; any size divisible by
        the encoder's stride product works).
      in_chans: frame channels (the head always predicts 3, as the official).
      enc_strides: encoder stage strides.
      enc_dims: encoder widths (official ``enc_dim a_b`` → ``(a,)·(n−1) + (b,)``).
      enc_blocks: ConvNeXt blocks per encoder stage.
      dec_strides: decoder upscale factors; ``∏enc_strides / ∏dec_strides`` is the square
        pixel-shuffle factor ``fc`` of the 1×1 stem (1 for the Bunny model).
      fc_dim: width of the first decoder feature map.
      ks_dec1, ks_dec2: decoder kernel ``min(ks_dec1 + 2i, ks_dec2)`` at stage i.
      reduce: width reduction per stage; lower_width: its floor.
      dec_blocks: blocks per decoder stage (the first upsamples).
      out_act: ``tanh`` ((tanh + 1)/2, official default), ``sigmoid`` or ``none``.
      block: ``nerv`` (HNeRV) or ``nervpp`` (NeRV++ blocks).
    """

    frame_size: tuple[int, int] = (640, 1280)
    in_chans: int = 3
    enc_strides: tuple[int, ...] = (5, 4, 4, 2, 2)
    enc_dims: tuple[int, ...] = (64, 64, 64, 64, 16)
    enc_blocks: int = 1
    dec_strides: tuple[int, ...] = (5, 4, 4, 2, 2)
    fc_dim: int = 68
    ks_dec1: int = 1
    ks_dec2: int = 5
    reduce: float = 1.2
    lower_width: int = 12
    dec_blocks: int = 1
    out_act: str = "tanh"
    block: str = "nerv"

    def __post_init__(self):
        if len(self.enc_strides) != len(self.enc_dims) or not self.enc_strides:
            raise ValueError(f"HNeRVConfig: enc_strides {self.enc_strides} and enc_dims "
                             f"{self.enc_dims} need one entry per stage")  # fmt: skip
        if min(self.enc_strides) < 1 or not self.dec_strides or min(self.dec_strides) < 1:
            raise ValueError(f"HNeRVConfig: strides must be positive, got enc {self.enc_strides} "
                             f"dec {self.dec_strides}")  # fmt: skip
        pe, pd = math.prod(self.enc_strides), math.prod(self.dec_strides)
        if pe % pd:
            raise ValueError(f"HNeRVConfig: prod(enc_strides)={pe} must be a multiple of "
                             f"prod(dec_strides)={pd}")  # fmt: skip
        if self.out_act not in OUT_ACTS:
            raise ValueError(f"HNeRVConfig.out_act must be one of {OUT_ACTS}, got {self.out_act!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"HNeRVConfig.block must be one of {BLOCKS}, got {self.block!r}")
        if self.fc_dim < 1 or self.lower_width < 1 or self.reduce <= 0 or self.dec_blocks < 1:
            raise ValueError(f"HNeRVConfig: fc_dim ({self.fc_dim}), lower_width "
                             f"({self.lower_width}), dec_blocks ({self.dec_blocks}) must be "
                             f"positive and reduce ({self.reduce}) > 0")  # fmt: skip
        h, w = self.frame_size
        if h % pe or w % pe:
            raise ValueError(f"HNeRVConfig.frame_size {self.frame_size} must be divisible by "
                             f"prod(enc_strides)={pe}")  # fmt: skip

    @property
    def fc(self) -> int:
        """Pixel-shuffle factor of the stem: ``∏enc_strides / ∏dec_strides``."""
        return math.prod(self.enc_strides) // math.prod(self.dec_strides)

    def embedding_shape(self, frame_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(h, w, E) of one frame's embedding."""
        h, w = frame_size or self.frame_size
        p = math.prod(self.enc_strides)
        return h // p, w // p, self.enc_dims[-1]


def solve_fc_dim(model_size: float, num_frames: int, frame_size: tuple[int, int],
                 config: HNeRVConfig) -> int:  # fmt: skip
    """The official ``train_nerv_all.py`` width solve: the largest root of ``a·d² + b·d − S``
    with ``S = model_size·1e6 − embedding values``, ``a = Σᵢ r^(2i+1)·sᵢ²·kᵢ²`` (r = 1/reduce),
    ``b = E·9·fc²`` — the decoder's approximate parameter count as a function of fc_dim d."""
    import numpy as np

    h, w = frame_size
    pe = math.prod(config.enc_strides)
    e = config.enc_dims[-1]
    embed = e / pe**2 * h * w * num_frames
    r = 1.0 / config.reduce
    a = r * sum(r ** (2 * i) * s**2 * nerv_kernel_size(i, config.ks_dec1, config.ks_dec2) ** 2
                for i, s in enumerate(config.dec_strides))  # fmt: skip
    b = e * config.fc**2 * 9
    return int(np.roots([a, b, -(model_size * 1e6 - embed)]).max())


class HNeRV(nn.Module):
    """Hybrid neural representation for videos (https://arxiv.org/abs/2304.02633): frames
    ``[B, H, W, C]`` → ConvNeXt embedding ``[B, h, w, E]`` → NeRV decoder → frames in [0, 1]
    ``[B, H', W', 3]`` with ``H' = h·fc·∏dec_strides``.

    ``encode`` and ``decode`` are separate methods (``model.apply(v, x, method="encode")``) so
    stored, quantised embeddings can be decoded without the encoder, as the official
    ``HNeRVDecoder``. The decoder: 1×1 conv to ``fc_dim·fc²`` → GELU → pixel shuffle (fc) →
    per stage i `NeRVBlock` (kernel ``min(ks_dec1 + 2i, ks_dec2)``, stride ``dec_strides[i]``,
    width ``/reduce``) → Conv3×3 → 3 → out_act.

    Attributes:
      see `HNeRVConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> m = HNeRV(frame_size=(16, 16), enc_strides=(2, 2, 2, 2), enc_dims=(8, 8, 8, 8),
      ...           dec_strides=(2, 2, 2, 2), fc_dim=16, lower_width=4)
      >>> x = jnp.ones((1, 16, 16, 3))
      >>> m.apply(m.init(jax.random.key(0), x), x).shape
      (1, 16, 16, 3)
    """

    frame_size: tuple[int, int] = (640, 1280)
    in_chans: int = 3
    enc_strides: tuple[int, ...] = (5, 4, 4, 2, 2)
    enc_dims: tuple[int, ...] = (64, 64, 64, 64, 16)
    enc_blocks: int = 1
    dec_strides: tuple[int, ...] = (5, 4, 4, 2, 2)
    fc_dim: int = 68
    ks_dec1: int = 1
    ks_dec2: int = 5
    reduce: float = 1.2
    lower_width: int = 12
    dec_blocks: int = 1
    out_act: str = "tanh"
    block: str = "nerv"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: HNeRVConfig, **kwargs: Any) -> HNeRV:
        """Build the model ``config.block`` names (`HNeRV` or `NeRVPlusPlus`)."""
        fields = dataclasses.asdict(config)
        fields.update(kwargs)
        kind = NeRVPlusPlus if fields.get("block") == "nervpp" else HNeRV
        return kind(**fields)

    def config(self) -> HNeRVConfig:
        return HNeRVConfig(tuple(self.frame_size), self.in_chans, tuple(self.enc_strides),
                           tuple(self.enc_dims), self.enc_blocks, tuple(self.dec_strides),
                           self.fc_dim, self.ks_dec1, self.ks_dec2, self.reduce, self.lower_width,
                           self.dec_blocks, self.out_act, self.block)  # fmt: skip

    def setup(self):
        cfg = self.config()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = HNeRVEncoder(cfg.enc_strides, cfg.enc_dims, cfg.enc_blocks, cfg.in_chans,
                                    **kw)  # fmt: skip
        self.stem = nn.Conv(cfg.fc_dim * cfg.fc**2, (1, 1), kernel_init=CONV_INIT, **kw)
        widths = nerv_widths(cfg.fc_dim, len(cfg.dec_strides), cfg.reduce, cfg.lower_width)
        blocks = []
        for i, (s, width) in enumerate(zip(cfg.dec_strides, widths, strict=True)):
            k = nerv_kernel_size(i, cfg.ks_dec1, cfg.ks_dec2)
            for j in range(cfg.dec_blocks):
                stride = 1 if j else s
                if cfg.block == "nervpp":
                    blocks.append(NeRVPlusPlusBlock(width, stride, k, **kw))
                else:
                    blocks.append(NeRVBlock(width, stride, k, **kw))
        self.blocks = blocks
        self.head = nn.Conv(3, (3, 3), padding=1, kernel_init=CONV_INIT, **kw)

    def encode(self, frames: Float[Array, "B H W C"]) -> Float[Array, "B h w E"]:
        """Frames → embeddings (the stored, quantisable representation)."""
        cfg = self.config()
        if getattr(frames, "ndim", None) != 4 or frames.shape[-1] != cfg.in_chans:
            raise ValueError(
                f"{type(self).__name__}.encode: frames must be [B, H, W, {cfg.in_chans}], got "
                f"shape {getattr(frames, 'shape', frames)}"
            )
        return self.encoder(frames)

    def decode(self, embedding: Float[Array, "B h w E"]) -> Float[Array, "B H W 3"]:
        """Embeddings → frames in [0, 1] (the official ``HNeRVDecoder``)."""
        cfg = self.config()
        e = cfg.enc_dims[-1]
        if getattr(embedding, "ndim", None) != 4 or embedding.shape[-1] != e:
            raise ValueError(f"{type(self).__name__}.decode: embedding must be [B, h, w, {e}], "
                             f"got shape {getattr(embedding, 'shape', embedding)}")  # fmt: skip
        if not jnp.issubdtype(embedding.dtype, jnp.floating):
            embedding = embedding.astype(jnp.float32)
        y = nn.gelu(self.stem(embedding), approximate=False)
        if cfg.fc > 1:
            # The official view(n, C, fc, fc, h, w) → (n, C, h·fc, w·fc) is torch's pixel shuffle.
            y = pixel_shuffle(y, cfg.fc)
        for blk in self.blocks:
            y = blk(y)
        y = self.head(y)
        if cfg.out_act == "tanh":
            return jnp.tanh(y) * 0.5 + 0.5
        if cfg.out_act == "sigmoid":
            return jax.nn.sigmoid(y)
        return y

    def __call__(self, frames: Float[Array, "B H W C"]) -> Float[Array, "B H W 3"]:
        return self.decode(self.encode(frames))


class NeRVPlusPlus(HNeRV):
    """NeRV++ (https://arxiv.org/abs/2402.18305) decoder on HNeRV's hybrid embeddings: every
    upsampling stage is a `jaxblocks.blocks.hnerv.NeRVPlusPlusBlock` (SCRB → Conv → PixelShuffle
    → GELU → SCRB, plus a bilinear skip). NeRV++ proper decodes NeRV's positional encoding of
    the frame index; sharing HNeRV's encoder here is a deliberate change so the two decoders can
    be compared on the same inputs.

    Attributes:
      see `HNeRV` (``block`` defaults to ``"nervpp"``).

    Example:
      >>> m = NeRVPlusPlus(frame_size=(16, 16), enc_strides=(2, 2, 2, 2), enc_dims=(8,) * 4,
      ...                  dec_strides=(2, 2, 2, 2), fc_dim=16, lower_width=4)
      >>> x = jnp.ones((1, 16, 16, 3))
      >>> m.apply(m.init(jax.random.key(0), x), x).shape
      (1, 16, 16, 3)
    """

    block: str = "nervpp"


# --- storage: quantisation and bits per pixel ------------------------------------------------


class QuantizedTensor(NamedTuple):
    """Integer codes with the per-tensor offset and step: ``x ≈ minimum + scale · codes``."""

    codes: Array
    minimum: Array
    scale: Array


def quantize_embedding(x: Array, bits: int = 6) -> QuantizedTensor:
    """Uniform ``bits``-bit quantisation with one min/max per tensor (the official
    ``hnerv_utils.quant_tensor`` per-tensor branch): ``scale = (max − min) / (2^bits − 1)``,
    ``codes = clip(round((x − min) / scale), 0, 2^bits − 1)``. The official also tries one
    min/max per slice of each axis (when that costs < 2% extra values) and keeps the lowest
    mean error; only the per-tensor scheme is implemented here. A constant tensor gets scale 1
    (codes 0) instead of the official's division by zero.

    Args:
      x: any floating array (embeddings ``[N, h, w, E]`` of all frames, or a weight).
      bits: code width, 1 to 16.

    Returns:
      `QuantizedTensor` (codes as uint8 for bits ≤ 8, else uint16); `dequantize_embedding`
      inverts it with error at most ``scale / 2``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"quantize_embedding: bits must be an int in [1, 16], got {bits!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        raise ValueError(f"quantize_embedding: x must be a non-empty floating array, got "
                         f"dtype {x.dtype} shape {x.shape}")  # fmt: skip
    xf = x.astype(jnp.float32)
    lo, hi = jnp.min(xf), jnp.max(xf)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    scale = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((xf - lo) / scale), 0, levels)
    return QuantizedTensor(codes.astype(jnp.uint8 if bits <= 8 else jnp.uint16), lo, scale)


def dequantize_embedding(q: QuantizedTensor, dtype: Any = jnp.float32) -> Array:
    """``minimum + scale · codes`` (the official ``dequant_tensor``)."""
    return (q.minimum + q.scale * q.codes.astype(jnp.float32)).astype(dtype)


def quantize_decoder_params(params: Any, bits: int = 8, skip: tuple[str, ...] = ("encoder",)):
    """Every parameter tensor outside the ``skip`` subtrees quantised and dequantised per tensor
    at ``bits`` (the official ``quant_model``: all weights but the encoder's). Returns
    ``(fake-quantised params, number of quantised tensors)``."""
    count = 0

    def visit(tree, top: bool):
        nonlocal count
        if isinstance(tree, dict) or hasattr(tree, "items"):
            return {k: (v if top and k in skip else visit(v, False)) for k, v in tree.items()}
        count += 1
        return dequantize_embedding(quantize_embedding(tree, bits), tree.dtype)

    return visit(params, True), count


def decoder_param_count(params: Any, skip: tuple[str, ...] = ("encoder",)) -> tuple[int, int]:
    """(values, tensors) of the parameters outside the ``skip`` subtrees (what is stored)."""
    leaves = [x for k, v in params.items() if k not in skip for x in jax.tree.leaves(v)]
    return sum(int(math.prod(x.shape)) for x in leaves), len(leaves)


def bits_per_pixel(num_embedding_values: int, num_decoder_params: int, num_pixels: int,
                   embed_bits: int = 6, model_bits: int = 8, num_tensors: int = 0,
                   overhead_bits: int = 16) -> float:  # fmt: skip
    """Stored bits per pixel: ``(E·embed_bits + P·model_bits + 2·T·overhead_bits) / pixels``
    with E embedding values, P decoder parameters and T quantised tensors each storing a min and
    a scale (the official counts them as float16, ``overhead_bits=16``). ``num_pixels`` is
    frames × H × W. The official entropy-codes the codes (Huffman) before counting; this is the
    fixed-length count, an upper bound on it."""
    counts = {"num_embedding_values": num_embedding_values,
              "num_decoder_params": num_decoder_params, "num_tensors": num_tensors}  # fmt: skip
    for name, v in counts.items():
        if v < 0:
            raise ValueError(f"bits_per_pixel: {name} must be >= 0, got {v}")
    if num_pixels <= 0:
        raise ValueError(f"bits_per_pixel: num_pixels must be positive, got {num_pixels}")
    total = (num_embedding_values * embed_bits + num_decoder_params * model_bits
             + 2 * num_tensors * overhead_bits)  # fmt: skip
    return total / num_pixels


def video_bpp(params: Any, embedding_shape: tuple[int, ...], frame_shape: tuple[int, int, int],
              embed_bits: int = 6, model_bits: int = 8) -> float:  # fmt: skip
    """Bits per pixel of a fitted video: embeddings of shape ``embedding_shape`` (all frames,
    one tensor) at ``embed_bits`` plus the decoder parameters of ``params`` (without the
    encoder) at ``model_bits``; ``frame_shape = (N, H, W)``."""
    values, tensors = decoder_param_count(params)
    n, h, w = frame_shape
    return bits_per_pixel(math.prod(embedding_shape), values, n * h * w, embed_bits, model_bits,
                          tensors + 1)  # fmt: skip


# --- presets ---------------------------------------------------------------------------------

_DEMO = dict(frame_size=(32, 32), enc_strides=(2, 2, 2, 2), enc_dims=(16, 16, 16, 16),
             dec_strides=(2, 2, 2, 2), lower_width=12)  # fmt: skip

HNERV_PRESETS: dict[str, HNeRVConfig] = {
    # README "HNeRV of 1.5M" on Bunny (132 frames, 640×1280); fc_dim from `solve_fc_dim`.
    "hnerv_bunny_1.5m": HNeRVConfig(),
    # The video-fitting demo (32×32 frames, 2×2×16 embeddings); NeRV++ at equal size (±2%).
    "hnerv_video_demo": HNeRVConfig(fc_dim=32, **_DEMO),
    "nervpp_video_demo": HNeRVConfig(fc_dim=29, block="nervpp", **_DEMO),
}

# Exact sums of numel() of the official torch HNeRV (encoder + decoder + head) built with the
# README Bunny arguments (tests/models/test_hnerv.py rebuilds it in torch and checks).
HNERV_PARAMS = {"hnerv_bunny_1.5m": 1_794_436}


def _example_frames(config: HNeRVConfig) -> Array:
    h, w = config.frame_size
    n = 2 * h * w * config.in_chans
    return jnp.linspace(0.0, 1.0, n, dtype=jnp.float32).reshape(2, h, w, config.in_chans)


register_presets(
    HNeRV.from_config,
    HNERV_PRESETS,
    example_input=_example_frames,
    doc="{name}: HNeRV / NeRV++ video representation preset; kwargs override config fields.",
    paper=Paper(
        "HNeRV: A Hybrid Neural Representation for Videos",
        arxiv="2304.02633",
        code="https://github.com/haochen-rye/HNeRV",
    ),  # fmt: skip
    published_params=HNERV_PARAMS,
    params_source="official haochen-rye/HNeRV model_all.py HNeRV with the README Bunny command "
    "(--enc_strds 5 4 4 2 2 --enc_dim 64_16 --dec_strds 5 4 4 2 2 --ks 0_1_5 --reduce 1.2 "
    "--lower_width 12 --modelsize 1.5; fc_dim 68 from train_nerv_all.py): sum of numel() of "
    "encoder (306,160) + decoder (1,487,517) + head (759); the README's '1.5M' is decoder + "
    "16,896 embedding values. The demo presets are this project's own sizes (no published count).",
    tiny={
        "frame_size": (16, 16),
        "enc_strides": (2, 2, 2, 2),
        "enc_dims": (8, 8, 8, 8),
        "dec_strides": (2, 2, 2, 2),
        "fc_dim": 16,
        "lower_width": 4,
    },
)


def _frame_psnr(pred: Array, target: Array) -> Array:
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def evaluate_video(model: HNeRV, variables: Any, frames: Array, embed_bits: int = 6,
                   model_bits: int = 8, batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """Fit quality and storage of a fitted `HNeRV` / `NeRVPlusPlus` on its video, as the
    official evaluation: frames are encoded, the embeddings of the whole video quantised as one
    tensor (`quantize_embedding`, ``embed_bits``) and decoded, then the decoder weights are
    quantised per tensor too (``model_bits``, `quantize_decoder_params`).

    Args:
      model: the model; variables: its fitted variables; frames: ``[N, H, W, C]`` in [0, 1].
      embed_bits, model_bits: code widths; batch_size: frames per forward pass.

    Returns:
      ``{"psnr": per-frame PSNR [N] (float model), "psnr_embed_q": per-frame PSNR with quantised
      embeddings, "psnr_all_q": with quantised embeddings and weights, "bpp": bits per pixel,
      "decoder_params": stored parameter count, "embedding_values": stored embedding count}``.
    """
    if getattr(frames, "ndim", None) != 4:
        raise ValueError(f"evaluate_video: frames must be [N, H, W, C], got shape "
                         f"{getattr(frames, 'shape', frames)}")  # fmt: skip
    frames = jnp.asarray(frames, jnp.float32)
    n = frames.shape[0]
    enc = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    dec = jax.jit(lambda v, e: model.apply(v, e, method="decode"))
    chunks = range(0, n, batch_size)
    emb = jnp.concatenate([enc(variables, frames[i : i + batch_size]) for i in chunks])

    def psnr_of(v, e):
        out = jnp.concatenate([dec(v, e[i : i + batch_size]) for i in chunks])
        return _frame_psnr(out, frames)

    emb_q = dequantize_embedding(quantize_embedding(emb, embed_bits))
    qparams, _ = quantize_decoder_params(variables["params"], model_bits)
    qvars = dict(variables, params=qparams)
    values, _ = decoder_param_count(variables["params"])
    return {
        "psnr": psnr_of(variables, emb),
        "psnr_embed_q": psnr_of(variables, emb_q),
        "psnr_all_q": psnr_of(qvars, emb_q),
        "bpp": video_bpp(variables["params"], emb.shape, frames.shape[:3], embed_bits, model_bits),
        "decoder_params": values,
        "embedding_values": int(math.prod(emb.shape)),
    }
