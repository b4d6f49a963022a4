"""SparK — Tian, Jiang, Diao, Lin, Liu, Yuan, "Designing BERT for Convolutional Networks: Sparse
and Hierarchical Masked Modeling", ICLR 2023, https://arxiv.org/abs/2301.03580 (official code:
keyu-tian/SparK, ``pretrain/encoder.py``, ``spark.py``, ``decoder.py``).

SparK pretrains *any* CNN by masked image modelling without changing it: random patches of the
image (one patch per pixel of the encoder's coarsest feature map) are dropped, and the CNN runs
on the visible patches only, as if its layers were sparse convolutions — after every
convolution the outputs at masked positions are set back to zero (so holes do not fill in
layer by layer), and every normalisation computes its statistics over the visible positions
only. The encoder's multi-scale features are *densified* (masked positions filled with a
learned mask token per scale, then projected) and a light U-Net decoder reconstructs the image;
the loss is the mean squared error of per-patch normalised pixels on the masked patches.

How the transform reaches an unmodified Linen model (`sparse_masking`): ``nn.intercept_methods``
replaces, while the encoder runs, the calls of the layers the official ``dense_model_to_sparse``
converts:

* ``flax.linen.Conv`` (and ``ConvTranspose``): its output multiplied by the active mask at
  the output's resolution (``SparseConv2d``).
* `jaxblocks.layers.ConvBN` (conv + BatchNorm fused in one module): the conv output is
  masked, then in train mode normalised with the mean and biased variance over the *active*
  positions only (``SparseBatchNorm2d``; the running statistics follow the Flax convention,
  where PyTorch's BatchNorm1d would store the unbiased variance), the residual added, the
  activation applied, the result masked again. Eval/tune modes use the running statistics
  (tune = eval numerics), deploy the folded kernel and bias.
* ``flax.linen.BatchNorm`` / ``GroupNorm``: statistics over the active positions (their
  ``mask`` argument), output masked. ``flax.linen.LayerNorm`` and ``Dense`` on feature maps
  (per position, so only the output needs masking: ``SparseConvNeXtLayerNorm``; a Dense on
  ``[B, H, W, C]`` is ConvNeXt's 1×1 conv, whose block the official code masks). On pooled
  ``[B, C]`` features (a classifier head) these layers are left alone.

Pooling written as a function (``nn.max_pool``) and layers not listed pass through unchanged, as
in the official code (its sparse max-pool only re-masks; the next convolution does that here).
Normalisations with their own statistics that are not listed (Ghost BN, EvoNorm, BCN) are not
made sparse: use ``norm="batch"`` encoders.

The active mask at resolution ``H`` is the coarse mask (``[B, h, w]``, one entry per patch) with
each entry repeated ``H / h`` times along each axis (``_get_active_ex_or_ii``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax import lax
from jaxtyping import Bool

from jaxblocks.layers.conv_bn import (
    ConvBN,
    bn_normalize,
    compute_dtype,
    resolve_convbn_mode,
    update_running_stats,
)
from jaxblocks.registry import Paper, create_model, register_model
from jaxblocks.typing import Array, Float

__all__ = [
    "DEFAULT_MASK_RATIO",
    "LightDecoder",
    "SparKPretrainer",
    "UNetBlock",
    "active_at",
    "masked_moments",
    "normalize_patches",
    "patchify",
    "random_patch_mask",
    "spark",
    "spark_loss",
    "sparse_masking",
    "unpatchify",
]

DEFAULT_MASK_RATIO = 0.6  # official pretrain/utils/arg_util.py: mask = 0.6
PATCH_NORM_EPS = 1e-6  # official spark.py: (var + 1e-6) ** .5
SPARSE_BN_EPSILON = 1e-5  # torch BatchNorm default, the official densify norm's

PAPER = Paper(
    "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling",
    arxiv="2301.03580",
    code="https://github.com/keyu-tian/SparK",
)


# ----------------------------------------------------------------------------------------------
# Pure functions: masks, patches, the loss.


def _check_ratio(mask_ratio: float, where: str) -> None:
    if not isinstance(mask_ratio, int | float) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"{where}: mask_ratio must be in (0, 1), got {mask_ratio!r}")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible: ``round(L·(1 − mask_ratio))`` (official ``len_keep``), which must
    leave at least one visible and one masked patch."""
    _check_ratio(mask_ratio, "num_visible")
    keep = round(num_patches * (1.0 - float(mask_ratio)))
    if not 0 < keep < num_patches:
        raise ValueError(
            f"SparK: mask_ratio={mask_ratio} keeps {keep} of {num_patches} patches visible; "
            "it must keep at least one visible and one masked (use a larger image or another "
            "mask_ratio)"
        )
    return keep


def random_patch_mask(
    key: jax.Array, batch: int, height: int, width: int, mask_ratio: float = DEFAULT_MASK_RATIO
) -> Bool[Array, "B h w"]:
    """Active (visible) patches of SparK (https://arxiv.org/abs/2301.03580): per image exactly
    ``round(h·w·(1 − mask_ratio))`` patches chosen uniformly without replacement (the official
    ``SparK.mask``: argsort of uniform noise, the first ``len_keep`` kept).

    Returns:
      bool ``[batch, height, width]``, True where the patch is visible.
    """
    _check_ratio(mask_ratio, "random_patch_mask")
    n = height * width
    keep = num_visible(n, mask_ratio)
    noise = jax.random.uniform(key, (batch, n))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # rank of each patch's noise
    return (rank < keep).reshape(batch, height, width)


def active_at(active: Bool[Array, "B h w"], height: int, width: int) -> Bool[Array, "B H W"]:
    """The coarse mask repeated to a ``height × width`` feature map (each entry ``height/h``
    times along H and ``width/w`` along W, as the official ``_get_active_ex_or_ii``)."""
    b, h, w = active.shape
    if height % h or width % w:
        raise ValueError(
            f"SparK: a feature map of size {height}x{width} is not a whole multiple of the "
            f"mask's {h}x{w} patches; the image size must be divisible by the encoder's stride"
        )
    return jnp.repeat(jnp.repeat(active, height // h, axis=1), width // w, axis=2)


def patchify(x: Float[Array, "B H W C"], patch: int) -> Float[Array, "B L P"]:
    """``[B, H, W, C]`` -> ``[B, (H/p)(W/p), p·p·C]``, patches row-major, each flattened in
    (row, column, channel) order (the official ``bchpwq -> bhwpqc``)."""
    b, h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: x of shape {x.shape} is not divisible into {patch}x{patch} "
                         "patches")  # fmt: skip
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: Float[Array, "B L P"], patch: int, height: int, width: int) -> Array:
    """Inverse of `patchify`: ``[B, L, p·p·C]`` -> ``[B, height, width, C]``."""
    b, n, d = x.shape
    hp, wp = height // patch, width // patch
    c = d // (patch * patch)
    if hp * wp != n or c * patch * patch != d:
        raise ValueError(f"unpatchify: {x.shape} does not hold {hp}x{wp} patches of "
                         f"{patch}x{patch}")  # fmt: skip
    x = x.reshape(b, hp, wp, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def normalize_patches(
    patches: Float[Array, "B L P"], eps: float = PATCH_NORM_EPS
) -> tuple[Array, Array, Array]:
    """Per-patch normalised targets of SparK: ``(x − mean) / sqrt(var + eps)`` over each patch's
    pixels, with the *unbiased* variance (the official ``inp.var(dim=-1)``), in fp32.

    Returns:
      ``(normalised, mean, std)``, mean and std ``[B, L, 1]``.
    """
    if patches.shape[-1] < 2:
        raise ValueError(f"normalize_patches: patches need >= 2 values each, got {patches.shape}")
    p = patches.astype(jnp.float32)
    mean = jnp.mean(p, axis=-1, keepdims=True)
    var = jnp.var(p, axis=-1, keepdims=True, ddof=1)
    std = jnp.sqrt(var + eps)
    return (p - mean) / std, mean, std


def spark_loss(
    pred: Float[Array, "B L P"], target: Float[Array, "B L P"], active: Bool[Array, "B L"]
) -> dict[str, Array]:
    """SparK's reconstruction loss per example (https://arxiv.org/abs/2301.03580): the mean over
    each *masked* patch of the squared error between the prediction and the per-patch
    normalised target (`normalize_patches`), averaged over the example's masked patches.

    With the same number of masked patches in every image (`random_patch_mask`), the batch mean
    of this is the official loss (a sum over all masked patches of the batch over their count).

    Args:
      pred: decoder output, patchified (`patchify`).
      target: the input image, patchified.
      active: True (or 1) for visible patches (no loss), False (0) for masked ones.

    Returns:
      ``{"loss": [B], "masked_mse": [B]}`` in fp32; ``masked_mse`` is the squared error in
      pixel units (prediction de-normalised with each patch's mean and std) on masked patches.
    """
    if pred.shape != target.shape or active.shape != pred.shape[:2]:
        raise ValueError(f"spark_loss: pred {pred.shape}, target {target.shape} and active "
                         f"{active.shape} must be [B, L, P], [B, L, P] and [B, L]")  # fmt: skip
    norm, mean, std = normalize_patches(target)
    p = pred.astype(jnp.float32)
    masked = 1.0 - active.astype(jnp.float32)  # [B, L]
    count = jnp.maximum(masked.sum(1), 1.0)
    l2 = jnp.mean(jnp.square(p - norm), axis=-1)  # [B, L]
    pix = jnp.mean(jnp.square(p * std + mean - target.astype(jnp.float32)), axis=-1)
    return {"loss": (l2 * masked).sum(1) / count, "masked_mse": (pix * masked).sum(1) / count}


def masked_moments(
    y: Float[Array, "B H W C"], mask: Bool[Array, "B H W"]
) -> tuple[Float[Array, " C"], Float[Array, " C"]]:
    """Per-channel mean and biased variance of ``y`` over the positions where ``mask`` is True
    (SparK's sparse BatchNorm statistics), two-pass, in fp32."""
    m = mask.astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(m), 1.0)
    y32 = y.astype(jnp.float32)
    mean = jnp.sum(y32 * m, axis=(0, 1, 2)) / count
    var = jnp.sum(jnp.square((y32 - mean.reshape(1, 1, 1, -1)) * m), axis=(0, 1, 2)) / count
    return mean, var


# ----------------------------------------------------------------------------------------------
# The sparse transform.


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else v  # type: ignore[return-value]


def _conv_padding(padding: Any) -> Any:
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _convbn_conv(module: ConvBN, x: Array, kernel: Array) -> Array:
    """The convolution of a 2-D `ConvBN` (its geometry, NHWC / HWIO)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=_pair(module.strides),
        padding=_conv_padding(module.padding),
        rhs_dilation=_pair(module.kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=module.feature_group_count,
    )


def _var(module: nn.Module, col: str, name: str) -> Array:
    return meta.unbox(module.get_variable(col, name))


def _sparse_convbn(module: ConvBN, active: Array, args: tuple, kwargs: dict) -> Array:
    """A `ConvBN` call made sparse: conv output masked, BN over the active positions."""
    x = args[0]
    mode = args[1] if len(args) > 1 else kwargs.get("mode")
    mode = resolve_convbn_mode(module, mode, kwargs.get("train"))
    residual, use_aux = kwargs.get("residual"), bool(kwargs.get("use_aux", False))
    dtype = compute_dtype(module.dtype, x)
    x = x.astype(dtype)
    kernel = _var(module, "params", "kernel").astype(dtype)
    y = _convbn_conv(module, x, kernel)
    m = _mask_for(active, y, "ConvBN")
    mk = m[..., None].astype(dtype)
    if mode == "deploy":
        y = y + _var(module, "params", "bias").astype(dtype).reshape(1, 1, 1, -1)
    else:
        if module.use_conv_bias:
            y = y + _var(module, "params", "conv_bias").astype(dtype).reshape(1, 1, 1, -1)
        y = y * mk  # sparse conv: holes stay empty
        sfx = "_aux" if use_aux else ""
        scale, bias = _var(module, "params", "scale" + sfx), _var(module, "params", "bias" + sfx)
        if mode == "train":
            mean, var = masked_moments(y, m)
            if module.is_mutable_collection("batch_stats"):
                ra_mean = _var(module, "batch_stats", "mean" + sfx)
                ra_var = _var(module, "batch_stats", "var" + sfx)
                new_mean, new_var = update_running_stats(ra_mean, ra_var, mean, var,
                                                         module.momentum)  # fmt: skip
                module.put_variable("batch_stats", "mean" + sfx, new_mean)
                module.put_variable("batch_stats", "var" + sfx, new_var)
        else:  # eval and tune (tune computes eval's numbers by folding)
            mean = _var(module, "batch_stats", "mean" + sfx)
            var = _var(module, "batch_stats", "var" + sfx)
        y = bn_normalize(y, mean, var, scale, bias, module.epsilon, dtype)
    y = y * mk
    if residual is not None:
        y = y + residual.astype(dtype)
    if module.activation is not None:
        y = module.activation(y)
    return y * mk


def _mask_for(active: Array, y: Any, where: str) -> Array:
    if not hasattr(y, "ndim") or y.ndim != 4:
        raise ValueError(
            f"sparse_masking: {where} returned shape {getattr(y, 'shape', None)}; SparK's "
            "sparse transform supports 2-D image layers with NHWC outputs only"
        )
    return active_at(active, y.shape[1], y.shape[2])


@contextlib.contextmanager
def sparse_masking(
    active: Bool[Array, "B h w"],
    *,
    taps: Callable[[nn.Module, Array], None] | None = None,
) -> Iterator[None]:
    """Run every supported Linen layer called inside the block as SparK's sparse layer
    (https://arxiv.org/abs/2301.03580; see the module docstring for the rules).

    Args:
      active: bool ``[B, h, w]``, True at the visible patches of the coarsest resolution; a
        feature map of size ``H × W`` uses it repeated ``H/h × W/w`` times.
      taps: optional ``taps(module, output)`` called after every ``__call__`` of every module
        (the pretrainer collects its multi-scale features with it).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> conv = nn.Conv(4, (3, 3))
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
      >>> v = conv.init(jax.random.key(1), x)
      >>> active = jnp.array([[[True, False], [False, True]]])
      >>> with sparse_masking(active):
      ...     y = conv.apply(v, x)
      >>> bool(jnp.all(y[0, :4, 4:] == 0))
      True
    """
    active = jnp.asarray(active)
    if active.ndim != 3 or active.dtype != jnp.bool_:
        raise ValueError(f"sparse_masking: active must be bool [B, h, w], got {active.dtype} "
                         f"{active.shape}")  # fmt: skip

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, ConvBN) and not module.is_initializing():
            if len(module.kernel_size) != 2:
                raise ValueError(f"sparse_masking: ConvBN with kernel_size {module.kernel_size}; "
                                 "only 2-D layers are supported")  # fmt: skip
            out = _sparse_convbn(module, active, args, kwargs)
        elif (
            isinstance(module, nn.BatchNorm | nn.GroupNorm)
            and not module.is_initializing()
            and getattr(args[0], "ndim", None) == 4
        ):
            m = _mask_for(active, args[0], type(module).__name__)
            out = next_fun(*args, **dict(kwargs, mask=m[..., None]))
            out = out * m[..., None].astype(out.dtype)
        elif isinstance(module, ConvBN | nn.Conv | nn.ConvTranspose):
            out = next_fun(*args, **kwargs)  # initialising (ConvBN) or a plain conv
            m = _mask_for(active, out, type(module).__name__)
            out = out * m[..., None].astype(out.dtype)
        elif isinstance(module, nn.LayerNorm | nn.Dense | nn.BatchNorm | nn.GroupNorm):
            # per position on feature maps (LayerNorm, Dense as a 1x1 conv): mask the output;
            # on pooled features (a head) nothing to do
            out = next_fun(*args, **kwargs)
            if getattr(out, "ndim", None) == 4:
                out = out * active_at(active, *out.shape[1:3])[..., None].astype(out.dtype)
        else:
            out = next_fun(*args, **kwargs)
        if taps is not None:
            taps(module, out)
        return out

    with nn.intercept_methods(interceptor):
        yield


# ----------------------------------------------------------------------------------------------
# Densify and the light decoder.

# Official LightDecoder.initialize: trunc_normal_(std=.02) on Conv2d (bounds ±2 absolute, so in
# effect untruncated), kaiming_normal_(fan_out, relu) on ConvTranspose2d, BN scale 1 / bias 0.
_dec_conv_init = nn.initializers.normal(0.02)
_dec_up_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv2d init (the official densify projections are not re-initialised).
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _mask_token_init(key, shape, dtype=jnp.float32):
    """Official ``trunc_normal_(p, mean=0, std=.02, a=-.02, b=.02)``: truncated at ±1 std."""
    return (0.02 * jax.random.truncated_normal(key, -1.0, 1.0, shape)).astype(dtype)


class UNetBlock(nn.Module):
    """SparK's decoder block (https://arxiv.org/abs/2301.03580, official ``UNetBlock``): a 4×4
    stride-2 transposed conv (2× upsampling, with bias), then 3×3 conv-BN-ReLU6 and 3×3 conv-BN
    (`ConvBN` layers, so every ConvBN mode applies).

    Attributes:
      features: output channels (the input's are kept through the upsampling and first conv).
    """

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], mode: str | None = None) -> Array:
        cin = x.shape[-1]
        # torch ConvTranspose2d(k=4, s=2, p=1) == a conv of the 2x-dilated input padded by k-1-p.
        x = nn.ConvTranspose(
            cin, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=_dec_up_init, name="up_sample",
        )(x)  # fmt: skip
        conv = lambda f, act, name: ConvBN(
            f, (3, 3), padding=((1, 1), (1, 1)), activation=act, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=_dec_conv_init, name=name,
        )  # fmt: skip
        x = conv(cin, jax.nn.relu6, "conv1")(x, mode)
        return conv(self.features, None, "conv2")(x, mode)


class LightDecoder(nn.Module):
    """SparK's light U-Net decoder (https://arxiv.org/abs/2301.03580, official ``LightDecoder``):
    ``log2(stride)`` `UNetBlock`s of widths ``width / 2**i``; block ``i`` first adds the
    densified feature ``to_dec[i]`` (None: nothing), the last is projected by a 1×1 conv (with
    bias) to the image's channels.

    Attributes:
      stride: the encoder's total stride (a power of 2 >= 2): the upsampling to undo.
      width: channels of the first block (768 in the paper for ResNet-50).
      out_channels: channels of the reconstruction.
    """

    stride: int
    width: int = 768
    out_channels: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, to_dec: Sequence[Array | None], mode: str | None = None) -> Array:
        n = round(math.log2(self.stride))
        if self.stride < 2 or 2**n != self.stride:
            raise ValueError(f"LightDecoder: stride must be a power of 2 >= 2, got {self.stride}")
        if self.width // 2**n < 1:
            raise ValueError(f"LightDecoder: width={self.width} cannot be halved {n} times")
        x = None
        for i in range(n):
            if i < len(to_dec) and to_dec[i] is not None:
                x = to_dec[i] if x is None else x + to_dec[i]
            if x is None:
                raise ValueError("LightDecoder: to_dec[0] (the coarsest feature) is missing")
            x = UNetBlock(self.width // 2 ** (i + 1), dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"dec_{i}")(x, mode)  # fmt: skip
        return nn.Conv(
            self.out_channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_dec_conv_init, name="proj",
        )(x)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The pretrainer.


def _unbound(module: nn.Module) -> nn.Module:
    return module.clone(parent=None, _deep_clone=True)


class SparKPretrainer(nn.Module):
    """SparK masked pretraining of a CNN (https://arxiv.org/abs/2301.03580) as one Linen model.

    Unlike MAE-style pretraining it needs no ViT and changes nothing in the CNN: ``encoder``
    (any Linen CNN built from ``nn.Conv``/`ConvBN`/BatchNorm/LayerNorm, e.g. a registered
    ``resnet18`` or ``mobilenet_v2``) runs on the masked image under `sparse_masking`. Its
    parameters and statistics live at the *same paths* as in the plain encoder (``share_scope``),
    so a fine-tuning run of the encoder starts from them with the trainer's ``stages``; the
    pretrainer's own variables are named ``spark_*``.

    One call: a random mask at the encoder's coarsest resolution (``mask_ratio`` of the
    patches masked, exactly; from the ``mask`` rng, else ``dropout``, else a fixed key), the
    image multiplied by it, the sparse encoder, its multi-scale features (the last output of
    the encoder's direct children at each resolution) densified from the coarsest: sparse BN,
    a learned mask token at the masked positions, a projection to the decoder width of that
    scale (1×1 for the coarsest, 3×3 after), then the `LightDecoder`.

    Attributes:
      encoder: the CNN (unbound; its ``num_classes`` head is ignored).
      mask_ratio: fraction of patches masked, in (0, 1) (0.6, official).
      decoder_width: channels of the first decoder block (768 official; halved per block).
      hierarchy: how many feature scales feed the decoder, coarsest first (4, official).
      dtype, param_dtype: compute and storage dtypes of the pretrainer's own layers.

    Call: ``model.apply(variables, x, active=None, train=None, rngs={"dropout": key})`` with
    ``x`` NHWC images whose size divides by the encoder's stride; returns
    ``{"pred": [B, L, p·p·C], "target": [B, L, p·p·C], "active": [B, L]}`` (patchified
    reconstruction, patchified input, int32 1 at visible patches): what `spark_loss` (the
    ``masked_pretraining`` task) scores.

    Example:
      >>> import jax
      >>> from jaxblocks.registry import create_model
      >>> enc = create_model("resnet18", width=8, stage_sizes=(1, 1, 1), stem="small",
      ...                    num_classes=0)
      >>> model = SparKPretrainer(enc, decoder_width=16)
      >>> x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
      >>> v = model.init(jax.random.key(1), x)
      >>> out, _ = model.apply(v, x, rngs={"dropout": jax.random.key(2)},
      ...                      mutable=["batch_stats"])
      >>> float(spark_loss(**out)["loss"].mean()) > 0
      True
    """

    encoder: nn.Module
    mask_ratio: float = DEFAULT_MASK_RATIO
    decoder_width: int = 768
    hierarchy: int = 4
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        nn.share_scope(self, self.encoder)

    def _probe(self, x: Array, train: bool | None) -> tuple[int, dict[str, int]]:
        """(total stride, {child name: stride}) of the encoder's direct children on ``x``'s
        shape, from an abstract run of an unbound copy."""
        enc = _unbound(self.encoder)
        found: list[tuple[str, tuple[int, ...]]] = []

        def tap(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            s = context.module.scope
            if context.method_name == "__call__" and s is not None and len(s.path) == 1:
                if hasattr(out, "ndim") and out.ndim == 4:
                    found.append((s.path[0], tuple(out.shape[1:3])))
            return out

        probe = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        kw = {} if train is None else {"train": train}
        with nn.intercept_methods(tap):
            jax.eval_shape(lambda v: enc.init(jax.random.key(0), v, **kw), probe)
        h, w = x.shape[1:3]
        if not found:
            raise ValueError(f"SparKPretrainer: the encoder {type(enc).__name__} has no direct "
                             "child returning an NHWC feature map")  # fmt: skip
        fh, fw = min(s[0] for _, s in found), min(s[1] for _, s in found)
        stride = h // fh
        sizes = sorted({s for _, s in found}, reverse=True)
        if (
            any(h % a or w % b for a, b in sizes)
            or h != stride * fh
            or w != stride * fw
            or (w // fw != stride)
        ):
            raise ValueError(
                f"SparKPretrainer: x of shape {x.shape}: the image height and width must be "
                f"divisible by the encoder's total stride (its feature maps here are "
                f"{sizes}); use a multiple of {2 ** max(1, round(math.log2(max(h / fh, 2))))}"
            )
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"SparKPretrainer: the encoder's stride must be a power of 2 >= 2, "
                             f"got {stride} (feature maps {sizes})")  # fmt: skip
        last: dict[int, str] = {}
        for name, (a, _) in found:
            last[h // a] = name  # the last child at each resolution
        return stride, {name: s for s, name in last.items()}

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        active: Bool[Array, "B h w"] | None = None,
        *,
        train: bool | None = None,
    ) -> dict[str, Array]:
        _check_ratio(self.mask_ratio, "SparKPretrainer")
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"SparKPretrainer: x must be NHWC [B, H, W, C], got shape "
                             f"{getattr(x, 'shape', None)}")  # fmt: skip
        mode = resolve_convbn_mode(self, None, train)
        dtype = compute_dtype(self.dtype, x)
        x = x.astype(dtype)
        b, h, w, c = x.shape
        stride, taps = self._probe(x, train)
        fh, fw = h // stride, w // stride
        if active is None:
            if self.has_rng("mask"):
                key = self.make_rng("mask")
            elif self.has_rng("dropout"):
                key = self.make_rng("dropout")
            else:  # evaluation without rngs: a fixed mask, so eval metrics are comparable
                key = jax.random.key(0)
            active = random_patch_mask(key, b, fh, fw, self.mask_ratio)
        elif active.shape != (b, fh, fw) or active.dtype != jnp.bool_:
            raise ValueError(f"SparKPretrainer: active must be bool [B, h, w] = {(b, fh, fw)} "
                             f"for x {x.shape}, got {active.dtype} {active.shape}")  # fmt: skip
        else:
            num_visible(fh * fw, self.mask_ratio)  # same check on the image size as the rng mask
        masked = x * active_at(active, h, w)[..., None].astype(dtype)

        feats: dict[int, Array] = {}
        depth = len(self.scope.path)

        def tap(module, out):
            s = module.scope
            if s is not None and len(s.path) == depth + 1 and s.path[-1] in taps:
                feats[taps[s.path[-1]]] = out

        kw = {} if train is None else {"train": train}
        with sparse_masking(active, taps=tap):
            self.encoder(masked, **kw)

        n_blocks = round(math.log2(stride))
        to_dec: list[Array | None] = []
        width = self.decoder_width
        for i in range(min(self.hierarchy, n_blocks)):
            s = stride // 2**i
            f = feats.get(s)
            if f is not None:
                m = active_at(active, f.shape[1], f.shape[2])[..., None]
                f = nn.BatchNorm(
                    use_running_average=mode != "train", momentum=0.9,
                    epsilon=SPARSE_BN_EPSILON, dtype=dtype, param_dtype=self.param_dtype,
                    name=f"spark_densify_norm_{i}",
                )(f, mask=m)  # fmt: skip
                token = self.param(f"spark_mask_token_{i}", _mask_token_init, (f.shape[-1],),
                                   self.param_dtype)  # fmt: skip
                f = jnp.where(m, f, token.astype(dtype).reshape(1, 1, 1, -1))
                if not (i == 0 and f.shape[-1] == width):  # official: identity when equal
                    k = 1 if i == 0 else 3
                    f = nn.Conv(
                        width, (k, k), padding=((k // 2, k // 2),) * 2, dtype=dtype,
                        param_dtype=self.param_dtype, kernel_init=_torch_conv_init,
                        name=f"spark_densify_proj_{i}",
                    )(f)  # fmt: skip
            to_dec.append(f)
            width //= 2
        decoder = LightDecoder(stride, self.decoder_width, c, dtype=dtype,
                               param_dtype=self.param_dtype, name="spark_decoder")  # fmt: skip
        rec = decoder(to_dec, mode)
        return {
            "pred": patchify(rec, stride),
            "target": patchify(x, stride),
            # int32 0/1, not bool: outputs stay subtractable (the registry compares modes)
            "active": active.reshape(b, fh * fw).astype(jnp.int32),
        }


# ----------------------------------------------------------------------------------------------
# Registry.


def _example_image() -> Array:
    # 64x64: ResNet-50's stride 32 leaves 2x2 patches (at 32x32 a single one: nothing to mask)
    return jnp.linspace(0.0, 1.0, 2 * 64 * 64 * 3, dtype=jnp.float32).reshape(2, 64, 64, 3)


@register_model(
    "spark",
    example_input=_example_image,
    paper=PAPER,
    published_params=None,
    params_source="no published count: a pretraining wrapper, its count is the encoder's plus "
    "a decoder sized by decoder_width (the paper publishes the fine-tuned ResNet-50's 26M, see "
    "resnet50)",
    tiny={
        "encoder": "resnet18",
        "width": 8,
        "stage_sizes": (1, 1, 1, 1),
        "stem": "small",
        "decoder_width": 16,
    },  # fmt: skip
)
def spark(
    encoder: str = "resnet50",
    *,
    mask_ratio: float = DEFAULT_MASK_RATIO,
    decoder_width: int = 768,
    hierarchy: int = 4,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    **encoder_kwargs: Any,
) -> SparKPretrainer:
    """SparK pretrainer (https://arxiv.org/abs/2301.03580) around the registered CNN ``encoder``
    built with ``encoder_kwargs`` (its classifier dropped: ``num_classes=0``).

    The encoder's keyword arguments are the ones its fine-tuning run uses, so a staged config
    shares them between the pretraining and fine-tuning stages (see
    ``jaxblocks/configs/spark_digits.py``).
    """
    _check_ratio(mask_ratio, "spark")
    kw = dict(encoder_kwargs, dtype=dtype, param_dtype=param_dtype)
    enc = create_model(encoder, **kw)
    if hasattr(enc, "num_classes"):
        enc = enc.clone(num_classes=0)
    return SparKPretrainer(enc, mask_ratio=mask_ratio, decoder_width=decoder_width,
                           hierarchy=hierarchy, dtype=dtype, param_dtype=param_dtype)  # fmt: skip
