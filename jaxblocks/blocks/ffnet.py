"""FFNet blocks: the FFNified token mixer, the channel mixer, RepVGGDW, the FFNet block and
patch merging, with the structural re-parameterisation of their BatchNorms and parallel
depthwise branches.

Yun, Lee, Ro, "FFNet: MetaMixer-based Efficient Convolutional Mixer Design" (first posted as
"MetaMixer Is All You Need"), https://arxiv.org/abs/2406.02021. Official code: ysj9909/FFNet
``models/ffnet.py`` (the layout, defaults and initialisers here follow it).

MetaMixer is the query-key-value form shared by self-attention and the FFN; *FFNification*
keeps that form but swaps attention's sub-operations for an FFN's: the query-key interaction
becomes a 1x1 conv (then a large-kernel depthwise conv), softmax becomes GELU, and the value
aggregation a second depthwise conv. The result, "FFNified attention" (`TokenMixer`), is a
purely convolutional token mixer; an inverted-bottleneck `ChannelMixer` follows it in each
`FFBlock`.

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow the official state
dict: ``Conv2d_BN`` is `Conv2dBN` with ``c`` (conv) and ``bn``; `RepVGGDW` has ``conv`` (k x k)
and ``conv1`` (k/2 x k/2); `TokenMixer` has ``fc``, ``conv1``, ``conv2``; `ChannelMixer` has
``conv``, ``fc1``, ``fc2``; `PatchMerging` has ``proj_0`` (RepVGGDW) and ``proj_1`` (the
official ``Conv2d_BN_skip``, here `BNConvSkip` with ``bn`` and ``conv``). Torch conv weights
``[O, I, kh, kw]`` map to Flax kernels ``w.transpose(2, 3, 1, 0)``.

BatchNorm follows `flax.linen.BatchNorm` semantics: ``momentum=0.9`` is the decay of the running
statistics (torch's ``momentum=0.1``), ``epsilon=1e-5`` as torch, and the running variance is
updated with the biased batch variance where torch uses the unbiased one (outputs are the same in
both modes; only the running variance drifts apart by a factor ``n / (n - 1)``).

Every module has a ``deploy`` switch that builds the inference form; `reparameterize` turns
trained (train-form) variables into the deploy form's, as the official ``fuse`` methods
(``Conv2d_BN``: BN into the conv; ``RepVGGDW``: both branches into one k x k conv;
``Conv2d_BN_skip``: BN and the identity into the 1x1 conv).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.nextvit import bn_affine, fold_pre_bn
from jaxblocks.blocks.unireplknet import SEBlock, pad_kernel_to
from jaxblocks.layers.conv_bn import fold
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "BNConvSkip",
    "ChannelMixer",
    "Conv2dBN",
    "FFBlock",
    "PatchMerging",
    "REPVGG_KERNEL_SIZE",
    "RepVGGDW",
    "TokenMixer",
    "fuse_bn_conv_skip",
    "fuse_conv_bn",
    "merge_repvggdw",
    "reparameterize",
    "se_width",
]

Dtype = Any
# The official _init_weights: trunc_normal(std=0.02) on every Conv2d and Linear weight, zero
# biases (torch truncates at +-2 absolute, i.e. +-100 std; Flax at +-2 std: immaterial).
default_kernel_init = nn.initializers.truncated_normal(0.02)
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm2d momentum 0.1
BN_EPSILON = 1e-5  # torch's BatchNorm2d default, used by FFNet
CONV_AXES = (None, None, "conv_in", "conv_out")
# The official mixers use a RepVGGDW (k x k + k/2 x k/2 branches) exactly where the kernel is 7,
# and a single depthwise conv otherwise (``if ks == 7``).
REPVGG_KERNEL_SIZE = 7


# ----------------------------------------------------------------------------- pure functions


def se_width(channels: int) -> int:
    """Hidden width of FFNet's SE, timm's ``SqueezeExcite(C, 0.25)``:
    ``make_divisible(C / 4, 8, round_limit=0)`` = ``max(8, int(C / 4 + 4) // 8 * 8)``."""
    return max(8, int(channels * 0.25 + 4) // 8 * 8)


def _unbox(tree: Any) -> Any:
    return nn.unbox(dict(tree)) if isinstance(tree, Mapping) else tree


def fuse_conv_bn(
    params: Mapping[str, Any], stats: Mapping[str, Any], *, epsilon: float = BN_EPSILON
) -> dict[str, Any]:
    """Deploy params of one `Conv2dBN` (official ``Conv2d_BN.fuse``): the BN's running
    statistics and affine folded into the conv, ``{"c": {"kernel", "bias"}}`` in fp32.

    Args:
      params: ``{"c": {"kernel"}, "bn": {"scale", "bias"}}``.
      stats: ``{"bn": {"mean", "var"}}``.
      epsilon: the BN's epsilon.
    """
    params, stats = _unbox(params), _unbox(stats)
    p, s = params["bn"], stats["bn"]
    kernel, bias = fold(params["c"]["kernel"], p["scale"], p["bias"], s["mean"], s["var"],
                        params["c"].get("bias"), epsilon=epsilon)  # fmt: skip
    return {"c": {"kernel": kernel, "bias": bias}}


def merge_repvggdw(
    params: Mapping[str, Any], stats: Mapping[str, Any], *, epsilon: float = BN_EPSILON
) -> dict[str, Any]:
    """Deploy params of one `RepVGGDW` (FFNet, https://arxiv.org/abs/2406.02021; the official
    ``RepVGGDW.fuse``): each branch's BN folded into its conv, the small kernel zero-padded to
    the large one (centres aligned) and added, the biases added. Exact in real arithmetic:
    both branches are "same"-padded depthwise convs with the same stride.

    Args:
      params: ``{"conv": <Conv2dBN>, "conv1": <Conv2dBN>}`` of a train-form `RepVGGDW`.
      stats: the matching ``batch_stats``.
      epsilon: the BNs' epsilon.

    Returns:
      ``{"conv": {"c": {"kernel": [k, k, 1, O], "bias": [O]}}}`` (fp32): the params of the same
      `RepVGGDW` built with ``deploy=True``.
    """
    params, stats = _unbox(params), _unbox(stats)
    if set(params) != {"conv", "conv1"}:
        raise ValueError(
            "merge_repvggdw: params must be those of a train-form RepVGGDW with branches "
            f"'conv' and 'conv1', got keys {sorted(params)} (already merged?)"
        )
    big = fuse_conv_bn(params["conv"], stats["conv"], epsilon=epsilon)["c"]
    small = fuse_conv_bn(params["conv1"], stats["conv1"], epsilon=epsilon)["c"]
    kernel = big["kernel"] + pad_kernel_to(small["kernel"], big["kernel"].shape[0])
    return {"conv": {"c": {"kernel": kernel, "bias": big["bias"] + small["bias"]}}}


def fuse_bn_conv_skip(
    params: Mapping[str, Any], stats: Mapping[str, Any], *, epsilon: float = BN_EPSILON
) -> dict[str, Any]:
    """Deploy params of one `BNConvSkip` (official ``Conv2d_BN_skip.fuse``): ``conv(BN(x)) + x``
    with a 1x1 conv becomes one 1x1 conv with bias: ``W' = diag(s) W + I``, ``b' = t W`` where
    ``BN(x) = x s + t``. Returns ``{"conv": {"kernel", "bias"}}``."""
    params, stats = _unbox(params), _unbox(stats)
    s, t = bn_affine(params["bn"], stats["bn"], epsilon)
    conv = fold_pre_bn({"kernel": params["conv"]["kernel"].astype(jnp.float32)}, s, t)
    c = conv["kernel"].shape[-1]
    eye = jnp.eye(c, dtype=jnp.float32).reshape(1, 1, c, c)
    return {"conv": {"kernel": conv["kernel"] + eye, "bias": conv["bias"]}}


def _is_conv_bn(params: Any) -> bool:
    return isinstance(params, Mapping) and set(params) == {"c", "bn"}


def _is_repvggdw(params: Any) -> bool:
    return (
        isinstance(params, Mapping)
        and set(params) == {"conv", "conv1"}
        and all(_is_conv_bn(params[k]) for k in ("conv", "conv1"))
    )


def _is_bn_conv_skip(params: Any) -> bool:
    return (
        isinstance(params, Mapping)
        and set(params) == {"bn", "conv"}
        and isinstance(params["conv"], Mapping)
        and "kernel" in params["conv"]
    )


def reparameterize(variables: Mapping[str, Any], *, epsilon: float = BN_EPSILON) -> dict[str, Any]:
    """Deploy-form variables of trained FFNet modules (https://arxiv.org/abs/2406.02021; the
    official ``export_model.replace_batchnorm``, which calls every ``fuse``).

    Walks the ``params`` tree of any FFNet module or model and replaces every train-form
    `RepVGGDW` (`merge_repvggdw`), `Conv2dBN` (`fuse_conv_bn`) and `BNConvSkip`
    (`fuse_bn_conv_skip`); everything else (plain depthwise convs, the 1x1 convs of the channel
    mixer, layer scales, SE, the model's final norm and head) is kept, as in the official code.
    The running statistics are used, so the result reproduces eval mode (``train=False``).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (boxed or unboxed) of a module built
        with ``deploy=False``.
      epsilon: the BatchNorms' epsilon.

    Returns:
      The variables of the same module built with ``deploy=True``; ``batch_stats`` keeps only
      the statistics of what was not fused (the model's final BatchNorm) and is dropped when
      empty.

    Example::

        deployed = reparameterize(variables)
        block.clone(deploy=True).apply(deployed, x)  # == block.apply(variables, x)
    """
    variables = nn.unbox(dict(variables))
    if "params" not in variables:
        raise ValueError(f"reparameterize: variables have no 'params' (keys {sorted(variables)})")
    fused: list[int] = []

    def walk(params: Any, stats: Any) -> tuple[Any, Any]:
        if not isinstance(params, Mapping):
            return params, stats
        stats = stats if isinstance(stats, Mapping) else {}
        for check, fuse in (
            (_is_repvggdw, merge_repvggdw),
            (_is_conv_bn, fuse_conv_bn),
            (_is_bn_conv_skip, fuse_bn_conv_skip),
        ):
            if check(params):
                fused.append(1)
                return fuse(params, stats, epsilon=epsilon), None
        new_params, new_stats = {}, {}
        for name, child in params.items():
            new_params[name], s = walk(child, stats.get(name, {}))
            if s:
                new_stats[name] = s
        for name, s in stats.items():  # statistics of modules without params (none in FFNet)
            if name not in params:
                new_stats[name] = s
        return new_params, new_stats

    params, stats = walk(variables["params"], variables.get("batch_stats", {}))
    if not fused:
        raise ValueError(
            "reparameterize: found no Conv2dBN, RepVGGDW or BNConvSkip in train form (params "
            "'c' + 'bn', 'conv' + 'conv1', 'bn' + 'conv'); are the variables already "
            "reparameterized?"
        )
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out


# ----------------------------------------------------------------------------- modules


def _check_nhwc(where: str, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")


def _check_positive(where: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")


def _check_odd(where: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1 or v % 2 == 0:
            raise ValueError(f"{where}: {name} must be an odd positive int (a 'same' depthwise "
                             f"conv), got {v!r}")  # fmt: skip


class _Layers:
    """Layer factories shared by the FFNet modules (which declare ``dtype``, ``param_dtype``
    and ``kernel_init``)."""

    def _conv(
        self,
        features: int,
        kernel: int,
        name: str,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> nn.Conv:
        pad = kernel // 2  # FFNet always pads k // 2 ("same" at stride 1)
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, CONV_AXES),
            name=name,
        )

    def _bn(self, train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _act(self, x: Array) -> Array:
        # torch.nn.GELU() is the exact (erf) form.
        return nn.gelu(x, approximate=False) if self.use_gelu else nn.relu(x)


class Conv2dBN(_Layers, nn.Module):
    """Conv -> BatchNorm, the official ``Conv2d_BN`` (FFNet, https://arxiv.org/abs/2406.02021).

    A ``kernel_size`` x ``kernel_size`` conv without bias, padding ``k // 2``, ``groups``
    groups, then BatchNorm; ``deploy=True`` is the fused form, the conv with a bias
    (`fuse_conv_bn`). The parameter names are the official ones (``c``, ``bn``).

    Attributes:
      features: output channels (a multiple of ``groups``).
      kernel_size, stride, groups: of the conv (``groups = C`` for depthwise).
      deploy: the fused form.
      dtype, param_dtype, kernel_init: compute/parameter dtypes and conv initialiser.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv2dBN(16, kernel_size=3, stride=2)
      >>> y, _ = layer.init_with_output(jax.random.key(0), jnp.ones((1, 9, 9, 8)))
      >>> y.shape
      (1, 5, 5, 16)
    """

    features: int = 0
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / stride), ceil(W / stride), features]`` for odd kernels; ``train``
        normalises with batch statistics (apply with ``mutable=["batch_stats"]``)."""
        _check_nhwc("Conv2dBN", x)
        _check_positive("Conv2dBN", features=self.features, kernel_size=self.kernel_size,
                        stride=self.stride, groups=self.groups)  # fmt: skip
        if x.shape[-1] % self.groups or self.features % self.groups:
            raise ValueError(
                f"Conv2dBN: x has {x.shape[-1]} channels (shape {x.shape}) and features="
                f"{self.features}; both must be multiples of groups={self.groups}"
            )
        conv = self._conv(self.features, self.kernel_size, "c", stride=self.stride,
                          groups=self.groups, bias=self.deploy)  # fmt: skip
        y = conv(x)
        return y if self.deploy else self._bn(train, "bn")(y)


class RepVGGDW(_Layers, nn.Module):
    """RepVGG-style depthwise conv (FFNet, https://arxiv.org/abs/2406.02021; official
    ``RepVGGDW``).

    Two parallel depthwise `Conv2dBN` branches with the same stride, a ``k x k`` (``conv``) and a
    ``k/2 x k/2`` (``conv1``, ``k // 2``: 3 for the official k = 7), summed. Training sees two
    kernels with their own BatchNorms; `merge_repvggdw` folds them into one ``k x k`` depthwise
    conv with bias (``deploy=True``). With ``features = m * C`` each input channel feeds ``m``
    outputs (torch's ``groups=in_dim``), as in `PatchMerging`'s 80 -> 160 downsampling.

    Attributes:
      features: output channels (None: the input's), a multiple of the input channels.
      kernel_size: the large kernel k (odd, with ``k // 2`` odd: 3, 7, 11, ...; official 7).
      stride: of both branches.
      deploy: the merged form.
      dtype, param_dtype, kernel_init: as `Conv2dBN`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = RepVGGDW().init(jax.random.key(0), x)
      >>> fast = RepVGGDW(deploy=True)
      >>> fast.apply(reparameterize(variables), x).shape  # == RepVGGDW().apply(variables, x)
      (2, 8, 8, 4)
    """

    features: int | None = None
    kernel_size: int = REPVGG_KERNEL_SIZE
    stride: int = 1
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / stride), ceil(W / stride), features]``; ``train`` as `Conv2dBN`."""
        _check_nhwc("RepVGGDW", x)
        k, c = self.kernel_size, x.shape[-1]
        if not isinstance(k, int) or k < 3 or k % 2 == 0 or (k // 2) % 2 == 0:
            raise ValueError(
                f"RepVGGDW: kernel_size must be odd with an odd small kernel k // 2 (3, 7, 11, "
                f"...), got {k!r}"
            )
        out = c if self.features is None else self.features
        if out % c:
            raise ValueError(
                f"RepVGGDW: features={out} must be a multiple of the input channels {c} "
                f"(x of shape {x.shape}; the convs are depthwise, groups = C)"
            )
        kw = dict(stride=self.stride, groups=c, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init)  # fmt: skip
        if self.deploy:
            return Conv2dBN(out, k, deploy=True, name="conv", **kw)(x)
        y = Conv2dBN(out, k, name="conv", **kw)(x, train=train)
        return y + Conv2dBN(out, k // 2, name="conv1", **kw)(x, train=train)


def _depthwise(module: Any, c: int, k: int, name: str, *, with_bn: bool) -> Callable[..., Array]:
    """The official mixers' depthwise conv of size k, called as ``f(x, train=...)``: a
    `RepVGGDW` if k == 7, else a depthwise `Conv2dBN` (``with_bn``) or a plain depthwise conv
    with bias."""
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype, kernel_init=module.kernel_init)
    if k == REPVGG_KERNEL_SIZE:
        return RepVGGDW(c, k, deploy=module.deploy, name=name, **kw)
    if with_bn:
        return Conv2dBN(c, k, groups=c, deploy=module.deploy, name=name, **kw)
    conv = module._conv(c, k, name, groups=c, bias=True)
    return lambda x, train: conv(x)


class TokenMixer(_Layers, nn.Module):
    """FFNified attention, the official ``Token_Mixer`` (FFNet, https://arxiv.org/abs/2406.02021).

    ``conv2(act(conv1(fc(x))))`` in the query-key-value form of attention: ``fc`` is a 1x1
    `Conv2dBN` (the query projection), ``conv1`` a depthwise conv of size ``ks1`` (the keys:
    learned spatial patterns the query is matched against, as an FFN's first weight), GELU in
    place of softmax, ``conv2`` a depthwise conv of size ``ks2`` (the values). Each depthwise
    conv is a `RepVGGDW` when its size is 7 and a plain depthwise conv with bias otherwise, as
    the official code. Unlike a ConvNeXt block, the "FFN" works over space (depthwise) and the
    channel mixing is a single projection. No residual: `FFBlock` adds it.

    Attributes:
      kernel_size1, kernel_size2: the two depthwise sizes (FFNet: 3 in stages 1-2, 7 in 3-4).
      use_gelu: GELU (exact), else ReLU.
      deploy: the fused form of ``fc`` and the RepVGGDWs.
      dtype, param_dtype, kernel_init: as `Conv2dBN`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = TokenMixer(3, 7).init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
      >>> y.shape
      (1, 8, 8, 16)
    """

    kernel_size1: int = 3
    kernel_size2: int = 3
    use_gelu: bool = True
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """Same shape as ``x``; ``train`` as `Conv2dBN`."""
        _check_nhwc("TokenMixer", x)
        _check_odd("TokenMixer", kernel_size1=self.kernel_size1, kernel_size2=self.kernel_size2)
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        y = Conv2dBN(c, 1, deploy=self.deploy, name="fc", **kw)(x, train=train)
        y = _depthwise(self, c, self.kernel_size1, "conv1", with_bn=False)(y, train=train)
        return _depthwise(self, c, self.kernel_size2, "conv2", with_bn=False)(
            self._act(y), train=train
        )


class ChannelMixer(_Layers, nn.Module):
    """The official ``Channel_Mixer`` (FFNet, https://arxiv.org/abs/2406.02021).

    ``fc2(act(fc1(conv(x))))``: a depthwise conv of size ``kernel_size`` (`RepVGGDW` if 7,
    else a depthwise `Conv2dBN`), then an inverted-bottleneck FFN of 1x1 convs with bias
    (hidden ``int(C * expansion_ratio)``). No residual: `FFBlock` adds it.

    Attributes:
      kernel_size: of the depthwise conv (FFNet-1: 3; FFNet-2/3/4: 7).
      expansion_ratio: hidden width / C (3).
      use_gelu: GELU (exact), else ReLU.
      deploy: the fused form of the depthwise conv.
      dtype, param_dtype, kernel_init: as `Conv2dBN`.
    """

    kernel_size: int = 3
    expansion_ratio: float = 3.0
    use_gelu: bool = True
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """Same shape as ``x``; ``train`` as `Conv2dBN`."""
        _check_nhwc("ChannelMixer", x)
        _check_odd("ChannelMixer", kernel_size=self.kernel_size)
        c = x.shape[-1]
        hidden = int(c * self.expansion_ratio)
        if hidden < 1:
            raise ValueError(f"ChannelMixer: expansion_ratio={self.expansion_ratio!r} gives a "
                             f"hidden width of {hidden} for {c} channels")  # fmt: skip
        y = _depthwise(self, c, self.kernel_size, "conv", with_bn=True)(x, train=train)
        y = self._act(self._conv(hidden, 1, "fc1")(y))
        return self._conv(c, 1, "fc2")(y)


class FFBlock(_Layers, nn.Module):
    """The FFNet block (FFNet, https://arxiv.org/abs/2406.02021; official ``FFBlock``).

    ``x = x + drop_path(ls1 * TokenMixer(x))``; optional SE (timm's ``SqueezeExcite(C, 0.25)``,
    width `se_width`); ``x = x + drop_path(ls2 * ChannelMixer(x))``. A MetaMixer block whose
    both mixers are FFN-shaped: FFNified attention mixes tokens, an inverted-bottleneck FFN with
    a depthwise conv mixes channels. There is no normalisation in the residual stream: the
    BatchNorms sit inside the convs and fold away for deployment (``deploy``).

    Attributes:
      kernel_size: of the channel mixer's depthwise conv.
      kernel_size1, kernel_size2: of the token mixer.
      expansion_ratio: of the channel mixer.
      use_se: SE after the token mixer (the official model sets it on even blocks of stages
        whose ``use_ses`` is True; off in every preset).
      use_gelu: GELU (exact), else ReLU.
      drop_path: stochastic-depth rate of both branches (rng "dropout").
      use_layer_scale: a learnable per-channel scale ``ls1``/``ls2`` on each branch
        (``token_layer_scale``, ``channel_layer_scale``; official ``layer_scale``), initialised
        to ``layer_scale_init_value`` (FFNet-3/4: 1e-6).
      deploy: the fused form of the mixers (layer scales are kept, as the official code).
      dtype, param_dtype, kernel_init: as `Conv2dBN`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = FFBlock(kernel_size=7, kernel_size1=7, kernel_size2=7)
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape  # eval: running statistics
      (2, 8, 8, 16)
    """

    kernel_size: int = 3
    kernel_size1: int = 3
    kernel_size2: int = 3
    expansion_ratio: float = 3.0
    use_se: bool = False
    use_gelu: bool = True
    drop_path: float = 0.0
    use_layer_scale: bool = False
    layer_scale_init_value: float = 1e-5
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    def _scale(self, y: Array, name: str) -> Array:
        if not self.use_layer_scale:
            return y
        init = nn.with_logical_partitioning(
            nn.initializers.constant(self.layer_scale_init_value), ("channels",)
        )
        gamma = self.param(name, init, (y.shape[-1],), self.param_dtype)
        return y * gamma.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B H W C"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]``.
          train: BN with batch statistics, updating the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path off; None means ``not train``.
        """
        _check_nhwc("FFBlock", x)
        deterministic = not train if deterministic is None else deterministic
        kw = dict(use_gelu=self.use_gelu, deploy=self.deploy, dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=self.kernel_init)  # fmt: skip
        y = TokenMixer(self.kernel_size1, self.kernel_size2, name="token_mixer", **kw)(
            x, train=train
        )
        x = x + drop_path(self, self._scale(y, "token_layer_scale"), self.drop_path, deterministic)
        if self.use_se:
            c = x.shape[-1]
            x = SEBlock(
                se_width(c),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                name="se",
            )(x)
        y = ChannelMixer(self.kernel_size, self.expansion_ratio, name="channel_mixer", **kw)(
            x, train=train
        )
        y = self._scale(y, "channel_layer_scale")
        return x + drop_path(self, y, self.drop_path, deterministic)


class BNConvSkip(_Layers, nn.Module):
    """``conv1x1(BN(x)) + x``, the official ``Conv2d_BN_skip`` (FFNet,
    https://arxiv.org/abs/2406.02021): a BatchNorm, a 1x1 conv without bias, a residual.
    ``deploy=True`` is one 1x1 conv with bias holding the BN and the identity
    (`fuse_bn_conv_skip`).

    Attributes:
      deploy: the fused form.
      dtype, param_dtype, kernel_init: as `Conv2dBN`.
    """

    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """Same shape as ``x``; ``train`` as `Conv2dBN`."""
        _check_nhwc("BNConvSkip", x)
        c = x.shape[-1]
        if self.deploy:
            return self._conv(c, 1, "conv", bias=True)(x)
        return self._conv(c, 1, "conv", bias=False)(self._bn(train, "bn")(x)) + x


class PatchMerging(_Layers, nn.Module):
    """FFNet downsampling, the official ``PatchMerging`` (https://arxiv.org/abs/2406.02021).

    A stride-2 `RepVGGDW` (7x7 + 3x3 depthwise, ``C -> out_features``, each input channel
    feeding ``out_features / C`` outputs), then `BNConvSkip` (``x + conv1x1(BN(x))``): the
    spatial reduction is depthwise and the channel mixing a residual pointwise conv, all of it
    foldable into two convs (``deploy``).

    Attributes:
      out_features: output channels, a multiple of the input channels.
      kernel_size: of the RepVGGDW (7).
      deploy: the fused form.
      dtype, param_dtype, kernel_init: as `Conv2dBN`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = PatchMerging(32).init_with_output(jax.random.key(0), jnp.ones((1, 9, 9, 16)))
      >>> y.shape
      (1, 5, 5, 32)
    """

    out_features: int = 0
    kernel_size: int = REPVGG_KERNEL_SIZE
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / 2), ceil(W / 2), out_features]``; ``train`` as `Conv2dBN`."""
        _check_nhwc("PatchMerging", x)
        _check_positive("PatchMerging", out_features=self.out_features)
        kw = dict(deploy=self.deploy, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init)  # fmt: skip
        x = RepVGGDW(self.out_features, self.kernel_size, stride=2, name="proj_0", **kw)(
            x, train=train
        )
        return BNConvSkip(name="proj_1", **kw)(x, train=train)
