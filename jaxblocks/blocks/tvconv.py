"""TVConv: translation-variant depthwise convolution with per-pixel kernels from affinity maps.

Chen, He, Chang, Wu, Yang, Lau, Cheng, "TVConv: Efficient Translation Variant Convolution for
Layout-aware Visual Processing", CVPR 2022, https://arxiv.org/abs/2203.10489. Official code:
JierunChen/TVConv ``face_recognition/model/atoms/TVConv.py`` (``TVConv``, ``TVConv_test``,
``TVConvInvertedResidual``, ``model_transform_for_test``).

For inputs with a fixed layout (aligned faces, fundus images) TVConv gives every output pixel
its own depthwise k×k kernel. The kernels do not depend on the input: a small conv net (the
*weight generator*) maps learnable *affinity maps* to ``C·k²`` channels at the output
resolution. At inference they are computed once (`precompute_tvconv_weights`) and the layer
is a per-pixel weighted sum of shifted inputs.

The math lives in the pure functions `tvconv_weight_generator`, `per_pixel_depthwise_conv`
and `precompute_tvconv_weights`; the Linen modules own the parameters and call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.typing import Array, Float

__all__ = [
    "TVConv",
    "TVConvInvertedResidual",
    "TVConvWeightGenerator",
    "per_pixel_depthwise_conv",
    "precompute_tvconv_weights",
    "tvconv_output_size",
    "tvconv_weight_generator",
]

Dtype = Any

# torch's LayerNorm / BatchNorm2d ε; BatchNorm2d's momentum 0.1 is flax's decay 0.9.
LN_EPSILON = 1e-5
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# torch's default Conv2d weight init, kept by the official code: U(±1/√fan_in).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
CONV_AXES = (None, None, "conv_in", "conv_out")
MAP_AXES = (None, None, "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "channels")


# --------------------------------------------------------------------------------------------
# Pure functions: the math.
# --------------------------------------------------------------------------------------------


def tvconv_output_size(size: int, kernel_size: int, strides: int) -> int:
    """Output side of a k×k window with padding (k−1)/2 and stride s: ⌊(n + 2p − k)/s⌋ + 1."""
    pad = (kernel_size - 1) // 2
    return (size + 2 * pad - kernel_size) // strides + 1


def _conv3x3(z: Float[Array, "h w I"], kernel: Float[Array, "3 3 I O"]) -> Float[Array, "h w O"]:
    # 'same' 3×3 conv without bias (padding 1), on a single unbatched map.
    y = jax.lax.conv_general_dilated(
        z[None], kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y[0]


def _layer_norm_hwc(
    z: Float[Array, "h w C"], scale: Float[Array, "h w C"], bias: Float[Array, "h w C"], eps: float
) -> Float[Array, "h w C"]:
    # torch nn.LayerNorm([C, h, w]): statistics over the whole map, elementwise affine.
    z32 = z.astype(jnp.float32)
    mean = jnp.mean(z32)
    var = jnp.mean(jnp.square(z32 - mean))  # biased, as torch
    y = ((z32 - mean) * jax.lax.rsqrt(var + eps)).astype(z.dtype)
    return y * scale + bias


def tvconv_weight_generator(
    affinity_maps: Float[Array, "h w P"], layers: Mapping[str, Array], epsilon: float = LN_EPSILON
) -> Float[Array, "h w O"]:
    """The TVConv weight generator: ``[Conv3×3 → LayerNorm(h, w, c) → ReLU] × n → Conv3×3``.

    Args:
      affinity_maps: the learnable position maps ``[h, w, posi_chans]``.
      layers: ``conv_i`` kernels ``[3, 3, in, out]`` with ``norm_i_scale``/``norm_i_bias``
        ``[h, w, out]`` for i = 0 … n−1, and ``conv_out`` ``[3, 3, inter, O]`` (the parameters of
        `TVConvWeightGenerator`).
      epsilon: LayerNorm ε (torch's 1e-5).

    Returns:
      ``[h, w, O]``: ``O = C·k²`` per-pixel kernels (channel-major, ``c·k² + tap``) or ``O = C``
      bias maps.
    """
    z = affinity_maps
    i = 0
    while f"conv_{i}" in layers:
        z = _conv3x3(z, layers[f"conv_{i}"])
        z = _layer_norm_hwc(z, layers[f"norm_{i}_scale"], layers[f"norm_{i}_bias"], epsilon)
        z = nn.relu(z)
        i += 1
    return _conv3x3(z, layers["conv_out"])


def per_pixel_depthwise_conv(
    x: Float[Array, "B H W C"],
    weight: Float[Array, "h w C k2"],
    kernel_size: int,
    strides: int = 1,
    bias: Float[Array, "h w C"] | None = None,
) -> Float[Array, "B h w C"]:
    """Translation-variant depthwise conv: ``out[b, i, j, c] = Σ_t W[i, j, c, t] ·
    unfold_t(x)[b, i, j, c] (+ bias[i, j, c])``.

    ``unfold`` is torch's ``nn.Unfold(k, padding=(k−1)/2, stride=s)`` (zero padding), with tap
    ``t = di·k + dj`` (row-major over the window). The sum runs over taps in fp32 (at least)
    and is cast back to ``x.dtype``.
    """
    k, s = kernel_size, strides
    b, hh, ww, c = x.shape
    h, w = weight.shape[0], weight.shape[1]
    if weight.shape != (h, w, c, k * k):
        raise ValueError(f"per_pixel_depthwise_conv: weight has shape {weight.shape}; expected "
                         f"[h, w, C={c}, k²={k * k}]")  # fmt: skip
    if (tvconv_output_size(hh, k, s), tvconv_output_size(ww, k, s)) != (h, w):
        raise ValueError(
            f"per_pixel_depthwise_conv: x has shape {x.shape}, which gives a "
            f"{tvconv_output_size(hh, k, s)}x{tvconv_output_size(ww, k, s)} output with "
            f"kernel_size={k}, strides={s}, but weight is for {h}x{w}"
        )
    if bias is not None and bias.shape != (h, w, c):
        raise ValueError(f"per_pixel_depthwise_conv: bias has shape {bias.shape}; expected "
                         f"[h={h}, w={w}, C={c}]")  # fmt: skip
    pad = (k - 1) // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    acc = jnp.zeros((b, h, w, c), acc_dtype)
    wa = weight.astype(acc_dtype)
    for di in range(k):
        for dj in range(k):
            # Window tap (di, dj) of every output pixel: [B, h, w, C].
            tap = jax.lax.slice(
                xp, (0, di, dj, 0), (b, di + s * (h - 1) + 1, dj + s * (w - 1) + 1, c), (1, s, s, 1)
            )
            acc = acc + tap.astype(acc_dtype) * wa[None, :, :, :, di * k + dj]
    if bias is not None:
        acc = acc + bias.astype(acc_dtype)[None]
    return acc.astype(x.dtype)


def precompute_tvconv_weights(variables: Mapping[str, Any], epsilon: float = LN_EPSILON) -> dict:
    """Run every TVConv's weight generator once: variables for the ``deploy=True`` modules.

    The official ``model_transform_for_test`` as a pure function of the variables: every
    `TVConv` parameter subtree (found by its ``affinity_maps``) becomes ``{"weight": [h, w,
    C·k²]}`` (plus ``"bias": [h, w, C]`` with ``use_bias``); other collections are kept. Apply
    the same model with ``deploy=True`` to these variables; its outputs equal the training
    form's (same functions, same order of operations).

    Args:
      variables: the (un)boxed variables of a model holding `TVConv` layers.
      epsilon: the generators' LayerNorm ε.

    Returns:
      The variables of the deploy form.
    """
    variables = nn.unbox(variables)

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        if "affinity_maps" in tree and "weight_layers" in tree:
            out = {"weight": tvconv_weight_generator(
                tree["affinity_maps"], tree["weight_layers"], epsilon)}  # fmt: skip
            if "bias_layers" in tree:
                out["bias"] = tvconv_weight_generator(
                    tree["affinity_maps"], tree["bias_layers"], epsilon
                )
            return out
        return {k: walk(v) for k, v in tree.items()}

    return {k: walk(v) if k == "params" else v for k, v in variables.items()}


# --------------------------------------------------------------------------------------------
# Linen modules: parameters and validation.
# --------------------------------------------------------------------------------------------


class TVConvWeightGenerator(nn.Module):
    """The parameters of TVConv's weight generator (https://arxiv.org/abs/2203.10489); the math
    is `tvconv_weight_generator`.

    Attributes:
      features: output channels (``C·k²`` for kernels, ``C`` for bias maps).
      inter_chans: hidden channels.
      inter_layers: hidden blocks after the first (the official ``TVConv_inter_layers``), so
        ``1 + inter_layers`` Conv→LayerNorm→ReLU blocks in all.
      epsilon: LayerNorm ε.
      param_dtype: parameter dtype (the generator runs in it; TVConv casts the result).
    """

    features: int
    inter_chans: int = 16
    inter_layers: int = 1
    epsilon: float = LN_EPSILON
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, affinity_maps: Float[Array, "h w P"]) -> Float[Array, "h w O"]:
        h, w, chans = affinity_maps.shape
        layers = {}
        for i in range(1 + self.inter_layers):
            layers[f"conv_{i}"] = self.param(
                f"conv_{i}",
                nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
                (3, 3, chans, self.inter_chans),
                self.param_dtype,
            )
            for part, init in (("scale", nn.initializers.ones), ("bias", nn.initializers.zeros)):
                layers[f"norm_{i}_{part}"] = self.param(
                    f"norm_{i}_{part}",
                    nn.with_logical_partitioning(init, MAP_AXES),
                    (h, w, self.inter_chans),
                    self.param_dtype,
                )
            chans = self.inter_chans
        layers["conv_out"] = self.param(
            "conv_out",
            nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
            (3, 3, chans, self.features),
            self.param_dtype,
        )
        return tvconv_weight_generator(affinity_maps, nn.unbox(layers), self.epsilon)


class TVConv(nn.Module):
    """TVConv (https://arxiv.org/abs/2203.10489): depthwise k×k conv with a different kernel at
    every output pixel, generated from learnable affinity maps.

    Unlike a depthwise `nn.Conv`, the kernels vary over space but not over inputs: a
    `TVConvWeightGenerator` maps ``affinity_maps`` ``[h, w, posi_chans]`` (init ones) to
    ``[h, w, C·k²]`` kernels, applied by `per_pixel_depthwise_conv`. The spatial size is
    therefore fixed: ``(h, w)`` is the *output* size (the official ``h_w``), and an input whose
    k×k / stride-s windows do not give ``h × w`` pixels is a ValueError. Channels come from the
    input at init.

    With ``deploy=True`` the layer holds the precomputed ``weight`` (and ``bias``) maps
    instead of the generator (`precompute_tvconv_weights`), as the official ``TVConv_test``.

    Deviations from the official code: any odd ``kernel_size`` (``TVConv_test`` asserts 3;
    even sizes do not give ``h × w`` outputs with its padding), and the deploy form is the same
    tap sum as training (not ``as_strided``), so the two agree for every input size the
    training form accepts.

    Attributes:
      h, w: output height and width (the size of the per-pixel weight maps).
      kernel_size: odd window size k.
      strides: stride of the windows.
      posi_chans: channels of the affinity maps.
      inter_chans: hidden channels of the weight generator.
      inter_layers: hidden Conv→LN→ReLU blocks after the first one.
      use_bias: also generate a per-pixel, per-channel bias map (the official ``TVConv_Bias``).
      deploy: use stored ``weight``/``bias`` maps (see `precompute_tvconv_weights`).
      epsilon: the generators' LayerNorm ε.
      dtype: compute dtype of the convolution (None: the input's); param_dtype: parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = TVConv(h=8, w=8)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y = layer.apply(variables, x)
      >>> y_deploy = layer.clone(deploy=True).apply(precompute_tvconv_weights(variables), x)
      >>> bool(jnp.allclose(y, y_deploy))
      True
    """

    h: int
    w: int
    kernel_size: int = 3
    strides: int = 1
    posi_chans: int = 4
    inter_chans: int = 16
    inter_layers: int = 1
    use_bias: bool = False
    deploy: bool = False
    epsilon: float = LN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _validate(self, x: Array) -> None:
        for name in ("h", "w", "kernel_size", "strides", "posi_chans", "inter_chans"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TVConv: {name}={v!r} must be a positive int")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"TVConv: kernel_size={self.kernel_size} must be odd")
        if not isinstance(self.inter_layers, int) or self.inter_layers < 0:
            raise ValueError(f"TVConv: inter_layers={self.inter_layers!r} must be an int >= 0")
        if x.ndim != 4:
            raise ValueError(f"TVConv: x must be NHWC [batch, height, width, channels], got "
                             f"shape {x.shape} (rank {x.ndim})")  # fmt: skip
        k, s = self.kernel_size, self.strides
        out = (tvconv_output_size(x.shape[1], k, s), tvconv_output_size(x.shape[2], k, s))
        if out != (self.h, self.w):
            raise ValueError(
                f"TVConv: x has shape {x.shape}; with kernel_size={k}, strides={s} it gives a "
                f"{out[0]}x{out[1]} output, but this layer's per-pixel weights are for "
                f"h={self.h}, w={self.w} (expected input height/width {self.h * s}x"
                f"{self.w * s}); TVConv has a fixed spatial size"
            )

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w C"]:
        self._validate(x)
        c, k2 = x.shape[-1], self.kernel_size**2
        dtype = self.dtype if self.dtype is not None else x.dtype
        if self.deploy:
            weight = self.param(
                "weight",
                nn.with_logical_partitioning(nn.initializers.zeros, MAP_AXES),
                (self.h, self.w, c * k2),
                self.param_dtype,
            )
            bias = None
            if self.use_bias:
                bias = self.param(
                    "bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, MAP_AXES),
                    (self.h, self.w, c),
                    self.param_dtype,
                )
        else:
            maps = self.param(
                "affinity_maps",
                nn.with_logical_partitioning(nn.initializers.ones, (None, None, None)),
                (self.h, self.w, self.posi_chans),
                self.param_dtype,
            )
            kw = {"inter_chans": self.inter_chans, "inter_layers": self.inter_layers,
                  "epsilon": self.epsilon, "param_dtype": self.param_dtype}  # fmt: skip
            weight = TVConvWeightGenerator(c * k2, name="weight_layers", **kw)(maps)
            bias = None
            if self.use_bias:
                bias = TVConvWeightGenerator(c, name="bias_layers", **kw)(maps)
        if weight.shape != (self.h, self.w, c * k2):
            raise ValueError(
                f"TVConv: weight has shape {weight.shape}; expected "
                f"[h={self.h}, w={self.w}, C·k²={c * k2}] for x of shape {x.shape}"
            )
        weight = weight.reshape(self.h, self.w, c, k2).astype(dtype)  # channel-major, as .view
        bias = None if bias is None else bias.astype(dtype)
        y = per_pixel_depthwise_conv(x.astype(dtype), weight, self.kernel_size, self.strides, bias)
        return nn.with_logical_constraint(y, ACTIVATION_AXES)


class TVConvInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual with TVConv in place of the depthwise conv
    (https://arxiv.org/abs/2203.10489).

    1×1 expand (BN, ReLU6; left out when ``expand_ratio == 1``) → `TVConv` (BN, ReLU6, stride)
    → 1×1 linear projection (BN), plus the input when ``strides == 1`` and the channels are
    unchanged. Convs have no bias; BatchNorm follows `flax.linen.BatchNorm` (torch's momentum
    0.1 as decay 0.9, ε 1e-5). ``train`` as every BatchNorm model here: True uses and updates
    batch statistics (``mutable=["batch_stats"]``), False the running ones, None trains when
    ``batch_stats`` is mutable (or at init) and otherwise raises.

    Attributes:
      features: output channels.
      h, w: spatial size after the TVConv (the official ``h_w``, square there).
      strides: 1 or 2, of the TVConv.
      expand_ratio: hidden channels / input channels.
      kernel_size, posi_chans, inter_chans, inter_layers, use_bias, deploy: of the `TVConv`.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = TVConvInvertedResidual(features=8, h=8, w=8)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
      >>> variables = block.init(jax.random.key(1), x)
      >>> block.apply(variables, x, train=False).shape
      (2, 8, 8, 8)
    """

    features: int
    h: int
    w: int
    strides: int = 1
    expand_ratio: float = 6
    kernel_size: int = 3
    posi_chans: int = 4
    inter_chans: int = 16
    inter_layers: int = 1
    use_bias: bool = False
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool | None = None
    ) -> Float[Array, "B h w F"]:
        train = resolve_train(self, train)
        if self.strides not in (1, 2):
            raise ValueError(f"TVConvInvertedResidual: strides={self.strides!r} must be 1 or 2")
        if x.ndim != 4:
            raise ValueError(f"TVConvInvertedResidual: x must be NHWC, got shape {x.shape}")
        dtype = self.dtype if self.dtype is not None else x.dtype
        x = x.astype(dtype)
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))

        def conv1x1(features, name):
            return nn.Conv(
                features, (1, 1), use_bias=False, dtype=dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
                name=name,
            )  # fmt: skip

        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                dtype=dtype, param_dtype=self.param_dtype, name=name,
            )  # fmt: skip

        y = x
        if self.expand_ratio != 1:
            y = nn.relu6(bn("expand_bn")(conv1x1(hidden, "expand")(y)))
        y = TVConv(
            self.h, self.w, self.kernel_size, self.strides, self.posi_chans, self.inter_chans,
            self.inter_layers, self.use_bias, self.deploy, dtype=dtype,
            param_dtype=self.param_dtype, name="tvconv",
        )(y)  # fmt: skip
        y = nn.relu6(bn("tvconv_bn")(y))
        y = bn("project_bn")(conv1x1(self.features, "project")(y))
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return nn.with_logical_constraint(y, ACTIVATION_AXES)
