"""EMOv2 blocks: the Improved Inverted Residual Mobile Block (i²RMB) and its window attention
(EW-MHSA: remote, close and hybrid windows).

Zhang et al., "EMOv2: Pushing 5M Vision Model Frontier", https://arxiv.org/abs/2412.06674
(extending EMO, "Rethinking Mobile Block for Efficient Attention-based Models", ICCV 2023).
Official code: zhangzjn/EMOv2 ``model/lib_emo/emo2.py`` (``iiRMB``, ``EW_MHSA_Remote``,
``EW_MHSA_Close``, ``EW_MHSA_Hybrid``) and ``model/lib_emo/basic_modules.py`` (``ConvNormAct``,
``get_norm``, ``LayerScale2D``).

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow the official ones
(``norm``, ``eops_<i>`` with ``qk`` / ``v``, ``conv_local/{conv,norm}``, ``proj``, ``ls``) so a
state dict maps onto them by name (convs OIHW -> HWIO; ``eops.<i>.net.conv`` -> ``eops_<i>``).

Official defaults kept: every norm has ε = 1e-6 (``get_norm``), BatchNorm and LayerNorm
(over channels, the official ``LayerNorm2d``); GELU is the exact (erf) one (timm's ``GELU``); the
depthwise conv is always followed by BN and SiLU whatever the block's activation; layer scale
starts at 1e-6; convs use torch's default init, ``U(±1/√fan_in)`` for weights and biases (the
official ``_init_weights`` only re-initialises Linear and norm layers). BatchNorm follows
`flax.linen.BatchNorm`: ``momentum=0.9`` is the decay of the running statistics (torch's 0.1)
and the running variance is updated with the biased batch variance (torch: unbiased; outputs
are the same in both modes). Not implemented: the official ``attn_pre`` and ``v_group``
switches and ``conv_ks`` / ``conv_groups`` of the conv EOP (off / 1 in every released model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.ninformer import torch_linear_bias_init
from jaxblocks.blocks.uniformer import torch_conv_kernel_init
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "EOPS",
    "EWMHSA",
    "IIRMB",
    "ConvNormAct",
    "ew_mhsa_attention",
    "gelu",
    "pad_to_window",
    "torch_same_padding",
    "window_merge",
    "window_partition",
]

Dtype = Any
NORM_EPSILON = 1e-6  # get_norm: every BN / LN of EMOv2
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm momentum 0.1
LS_INIT = 1e-6  # ls_value of every released model
# The efficient operators (EOPs) of the official iiRMB: hybrid_eops 0 / 1 / 2 / 3.
EOPS = ("conv", "remote", "close", "hybrid")
WINDOW_MODES = ("remote", "close")
CONV_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "channels")
# timm's GELU (used by the official get_act) is the exact, erf-based one.
gelu = functools.partial(nn.gelu, approximate=False)


# ----------------------------------------------------------------------------- pure functions


def torch_same_padding(kernel: int, stride: int) -> int:
    """The official ``ConvNormAct`` padding, ``ceil((k - s) / 2)`` on every side."""
    return math.ceil((kernel - stride) / 2)


def _window_hw(window_size: int, h: int, w: int) -> tuple[int, int]:
    """``(wh, ww)``: ``window_size`` on both axes, or the whole map when it is <= 0."""
    return (h, w) if window_size <= 0 else (window_size, window_size)


def pad_to_window(
    x: Float[Array, "B H W C"], window_size: int
) -> tuple[Float[Array, "B Hp Wp C"], tuple[int, int]]:
    """Zero-pad bottom and right to multiples of ``window_size`` (the whole map if <= 0), as the
    official ``F.pad``; returns the padded map and the window ``(wh, ww)``."""
    _, h, w, _ = x.shape
    wh, ww = _window_hw(window_size, h, w)
    pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
    if pad_b or pad_r:
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    return x, (wh, ww)


def _check_partition(where: str, x: Array, window: tuple[int, int], mode: str) -> None:
    if mode not in WINDOW_MODES:
        raise ValueError(f"{where}: mode must be one of {WINDOW_MODES}, got {mode!r}")
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")
    wh, ww = window
    if wh < 1 or ww < 1 or x.shape[1] % wh or x.shape[2] % ww:
        raise ValueError(
            f"{where}: x of shape {x.shape} is not a multiple of the window {window} along H, W; "
            "pad it first (pad_to_window)"
        )


def window_partition(
    x: Float[Array, "B H W C"], window: tuple[int, int], mode: str
) -> Float[Array, "B n1 n2 T C"]:
    """Split a map whose H, W are multiples of ``window = (wh, ww)`` into ``n1 x n2`` windows of
    ``T = wh * ww`` tokens (row-major within a window).

    ``"close"``: contiguous ``wh x ww`` blocks, window ``(i, j)`` holds rows ``i*wh .. i*wh+wh-1``
    (the official ``(n1 h1) (n2 w1)``). ``"remote"``: dilated windows spanning the whole map,
    window ``(i, j)`` holds rows ``i, i + n1, i + 2 n1, ...`` (the official ``(h1 n1) (w1 n2)``).
    """
    _check_partition("window_partition", x, window, mode)
    b, h, w, c = x.shape
    wh, ww = window
    n1, n2 = h // wh, w // ww
    if mode == "close":
        y = x.reshape(b, n1, wh, n2, ww, c).transpose(0, 1, 3, 2, 4, 5)  # [B, n1, n2, wh, ww, C]
    else:
        y = x.reshape(b, wh, n1, ww, n2, c).transpose(0, 2, 4, 1, 3, 5)  # [B, n1, n2, wh, ww, C]
    return y.reshape(b, n1, n2, wh * ww, c)


def window_merge(
    y: Float[Array, "B n1 n2 T C"], window: tuple[int, int], mode: str
) -> Float[Array, "B H W C"]:
    """Inverse of `window_partition`: ``[B, n1, n2, wh * ww, C]`` -> ``[B, n1 wh, n2 ww, C]``."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"window_merge: mode must be one of {WINDOW_MODES}, got {mode!r}")
    b, n1, n2, t, c = y.shape
    wh, ww = window
    if t != wh * ww:
        raise ValueError(f"window_merge: y has {t} tokens per window, window {window} needs "
                         f"{wh * ww}")  # fmt: skip
    y = y.reshape(b, n1, n2, wh, ww, c)
    if mode == "close":
        y = y.transpose(0, 1, 3, 2, 4, 5)  # [B, n1, wh, n2, ww, C]
    else:
        y = y.transpose(0, 3, 1, 4, 2, 5)  # [B, wh, n1, ww, n2, C]
    return y.reshape(b, n1 * wh, n2 * ww, c)


def ew_mhsa_attention(
    qk: Float[Array, "B H W 2C"],
    v: Float[Array, "B H W V"],
    *,
    heads: int,
    window: tuple[int, int],
    modes: Sequence[str] = ("remote", "close"),
    weights_fn: Callable[[Array], Array] | None = None,
) -> Float[Array, "B H W V"]:
    """Window multi-head attention of EW-MHSA on a map already padded to the window.

    ``qk`` holds the queries then the keys (``heads`` heads each, the official
    ``(qk heads dim_head)`` channel order); ``v`` the values (``heads`` heads of ``V / heads``
    channels, which may differ from the query width). For each mode in ``modes`` the map is
    split into windows (`window_partition`), ``softmax(q k^T / sqrt(C / heads)) v`` is taken per
    window and head, and the results are merged back and **summed** (the hybrid EW-MHSA uses
    both partitions). Logits, softmax and the weighted sum in fp32; the result in ``v.dtype``.
    ``weights_fn`` (e.g. dropout) is applied to the attention weights.
    """
    c2, cv = qk.shape[-1], v.shape[-1]
    if c2 % (2 * heads) or cv % heads:
        raise ValueError(
            f"ew_mhsa_attention: qk channels {c2} must be 2 * heads * K and v channels {cv} a "
            f"multiple of heads={heads}"
        )
    if qk.shape[:3] != v.shape[:3]:
        raise ValueError(f"ew_mhsa_attention: qk {qk.shape} and v {v.shape} differ in [B, H, W]")
    k_dim = c2 // (2 * heads)
    out = None
    for mode in modes:
        qkw = window_partition(qk, window, mode)  # [B, n1, n2, T, 2C]
        vw = window_partition(v, window, mode)  # [B, n1, n2, T, V]
        split = lambda t, d: t.reshape(*t.shape[:-1], heads, d)  # noqa: E731  [..., T, heads, d]
        q = split(qkw[..., : c2 // 2], k_dim).astype(jnp.float32)
        k = split(qkw[..., c2 // 2 :], k_dim).astype(jnp.float32)
        logits = jnp.einsum("bnmthk,bnmshk->bnmhts", q, k) * k_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1)  # [B, n1, n2, heads, T, T]
        if weights_fn is not None:
            weights = weights_fn(weights)
        y = jnp.einsum("bnmhts,bnmshd->bnmthd", weights, split(vw, cv // heads).astype(jnp.float32))
        y = window_merge(y.reshape(*y.shape[:-2], cv), window, mode)  # [B, H, W, V]
        out = y if out is None else out + y
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------- modules


def _check_nhwc(where: str, x: Array) -> None:
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {shape}")


def _conv(module, features: int, kernel: int, cin: int, name: str, *, stride: int = 1,
          groups: int = 1, bias: bool = False) -> nn.Conv:  # fmt: skip
    """torch-initialised ``Conv2d`` with the official padding ``ceil((k - s) / 2)``."""
    pad = torch_same_padding(kernel, stride)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(module.kernel_init, CONV_AXES),
        bias_init=torch_linear_bias_init(kernel * kernel * cin // groups),
        name=name,
    )


def _batch_norm(module, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=NORM_EPSILON,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


class ConvNormAct(nn.Module):
    """The official ``ConvNormAct`` of EMOv2 (https://arxiv.org/abs/2412.06674): ``k x k`` conv
    (padding ``ceil((k - s) / 2)``) -> optional BatchNorm (ε 1e-6) -> optional activation.

    Attributes:
      features: output channels.
      kernel_size, stride, groups: of the conv (``groups = C`` for depthwise).
      use_bias: conv bias.
      use_norm: BatchNorm after the conv.
      act: activation (None: none).
      dtype, param_dtype, kernel_init: compute/parameter dtypes, conv weight initialiser.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = ConvNormAct(8, 3, stride=2, act=jax.nn.silu)
      >>> y, _ = layer.init_with_output(jax.random.key(0), jnp.ones((1, 7, 7, 3)))
      >>> y.shape
      (1, 4, 4, 8)
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    use_norm: bool = True
    act: Callable[[Array], Array] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = torch_conv_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, H', W', features]``; ``train`` normalises with batch statistics."""
        _check_nhwc("ConvNormAct", x)
        x = _conv(self, self.features, self.kernel_size, x.shape[-1], "conv", stride=self.stride,
                  groups=self.groups, bias=self.use_bias)(x)  # fmt: skip
        if self.use_norm:
            x = _batch_norm(self, train, "norm")(x)
        return x if self.act is None else self.act(x)


class EWMHSA(nn.Module):
    """Efficient Window Multi-Head Self-Attention, EW-MHSA (EMOv2,
    https://arxiv.org/abs/2412.06674): the attention EOP of the i²RMB.

    ``x`` is zero-padded (bottom/right) to a multiple of ``window_size``; ``qk = Conv1x1(x)``
    (``2 C``, queries then keys, ``C / dim_head`` heads), ``v = act(Conv1x1(x))`` (``features``
    channels, the block's expanded width, split over the same heads); attention is computed
    inside windows (`ew_mhsa_attention`) and the result cropped back to ``H x W``. Padded
    positions take part as keys and values (their ``k`` and ``v`` are the conv biases), as in
    the official code. ``mode``: ``"remote"`` (dilated windows spanning the map, EMOv1's
    ``EW_MHSA_Remote``), ``"close"`` (contiguous windows) or ``"hybrid"`` (both, on shared
    ``qk`` and ``v``, summed: EMOv2's ``EW_MHSA_Hybrid``) — the spanning/close window
    attention that lets EMOv2 see the whole map at window cost.

    Attributes:
      features: value / output channels (the official ``dim_mid``).
      dim_head: query/key channels per head (input channels must be a multiple).
      window_size: window side; <= 0 attends over the whole map (no padding).
      mode: ``"remote"``, ``"close"`` or ``"hybrid"``.
      qkv_bias: bias of the ``qk`` and ``v`` convs (the official default False; EMOv2 True).
      act: activation of ``v`` (the official default ReLU; EMOv2 GELU).
      attn_drop: dropout of the attention weights.
      dtype, param_dtype, kernel_init: as `ConvNormAct`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> attn = EWMHSA(48, dim_head=8, window_size=4)
      >>> y, _ = attn.init_with_output(jax.random.key(0), jnp.ones((1, 6, 9, 16)))
      >>> y.shape
      (1, 6, 9, 48)
    """

    features: int
    dim_head: int = 64
    window_size: int = 7
    mode: str = "hybrid"
    qkv_bias: bool = False
    act: Callable[[Array], Array] = nn.relu
    attn_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = torch_conv_kernel_init

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B H W F"]:
        """Attend within windows; ``deterministic=False`` enables attention dropout."""
        _check_nhwc("EWMHSA", x)
        if self.mode not in ("remote", "close", "hybrid"):
            raise ValueError(f"EWMHSA: mode must be 'remote', 'close' or 'hybrid', got "
                             f"{self.mode!r}")  # fmt: skip
        b, h, w, c = x.shape
        if self.dim_head < 1 or c % self.dim_head:
            raise ValueError(f"EWMHSA: x has {c} channels (shape {x.shape}), not a multiple of "
                             f"dim_head={self.dim_head}")  # fmt: skip
        heads = c // self.dim_head
        if self.features % heads:
            raise ValueError(
                f"EWMHSA: features={self.features} must be a multiple of the {heads} heads "
                f"({c} channels / dim_head {self.dim_head})"
            )
        xp, window = pad_to_window(x, self.window_size)
        qk = _conv(self, 2 * c, 1, c, "qk", bias=self.qkv_bias)(xp)  # [B, Hp, Wp, 2C]
        v = self.act(_conv(self, self.features, 1, c, "v", bias=self.qkv_bias)(xp))
        modes = WINDOW_MODES if self.mode == "hybrid" else (self.mode,)
        dropout = nn.Dropout(self.attn_drop, deterministic=deterministic)
        y = ew_mhsa_attention(qk, v, heads=heads, window=window, modes=modes, weights_fn=dropout)
        return y[:, :h, :w]


class IIRMB(nn.Module):
    """Improved Inverted Residual Mobile Block, i²RMB (EMOv2, https://arxiv.org/abs/2412.06674).

    EMOv2's instance of the one-residual Meta Mobile Block (MMBlock): an inverted residual whose
    expansion is an "efficient operator" (EOP) that may be attention::

        y = norm(x)                                   # BN (stages 1-2) or LN (3-4), ε 1e-6
        y = sum(EOP(y) for EOP in eops)               # C -> C * exp_ratio
        y = y + DW_kxk(y)  (DW only without skip)     # depthwise conv -> BN -> SiLU
        y = dropout(y); y = Conv1x1(y)                # -> out_features, no norm/act/bias
        out = x + drop_path(γ y)  (γ y without skip)  # layer scale γ, init 1e-6

    EOPs: ``"conv"`` (1x1 conv + ``act``, the inverted-residual expansion), ``"remote"``,
    ``"close"`` or ``"hybrid"`` (`EWMHSA` window attention; the attention's values are the
    expansion). The skips (inner around the DW conv, outer around the block) exist only when
    ``has_skip`` and the block keeps shape (``stride == 1`` and ``C == out_features``), as the
    official ``iiRMB``; the DW conv carries the stride.

    Attributes:
      out_features: output channels.
      exp_ratio: expansion ``C_mid = int(C * exp_ratio)``.
      norm: ``"bn"``, ``"ln"`` or ``"none"``.
      act: activation of the EOP (official default ReLU; EMOv2 SiLU / GELU).
      dw_kernel: depthwise kernel size (0: no DW conv, the official ``nn.Identity``).
      stride: of the DW conv (1 or 2).
      dim_head, window_size: of the attention EOPs (`EWMHSA`).
      eops: names from `EOPS`, summed when several (the official ``hybrid_eops``).
      qkv_bias: bias of the EOP convs (official default False; EMOv2 True).
      has_skip: allow the skips (still only when the shape is kept).
      attn_drop, proj_drop: attention-weight dropout; dropout before ``proj`` (official ``drop``).
      drop_path: stochastic depth of the residual branch.
      ls_init: layer-scale init (1e-6); <= 0 leaves the layer scale out.
      dtype, param_dtype, kernel_init: as `ConvNormAct`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = IIRMB(16, exp_ratio=2.0, norm="ln", dim_head=8, eops=("hybrid",))
      >>> x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
      >>> variables = block.init(jax.random.key(1), x)
      >>> block.apply(variables, x).shape
      (2, 9, 9, 16)
    """

    out_features: int
    exp_ratio: float = 1.0
    norm: str = "bn"
    act: Callable[[Array], Array] = nn.relu
    dw_kernel: int = 3
    stride: int = 1
    dim_head: int = 64
    window_size: int = 7
    eops: tuple[str, ...] = ("conv",)
    qkv_bias: bool = False
    has_skip: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    drop_path: float = 0.0
    ls_init: float = LS_INIT
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = torch_conv_kernel_init

    def _validate(self, x: Array) -> None:
        _check_nhwc("IIRMB", x)
        if self.norm not in ("bn", "ln", "none"):
            raise ValueError(f"IIRMB: norm must be 'bn', 'ln' or 'none', got {self.norm!r}")
        if not self.eops or any(e not in EOPS for e in self.eops):
            raise ValueError(f"IIRMB: eops must be a non-empty tuple of {EOPS}, got "
                             f"{self.eops!r}")  # fmt: skip
        if self.stride not in (1, 2):
            raise ValueError(f"IIRMB: stride must be 1 or 2, got {self.stride}")
        c = x.shape[-1]
        if any(e != "conv" for e in self.eops) and (self.dim_head < 1 or c % self.dim_head):
            raise ValueError(
                f"IIRMB: x has {c} input channels (shape {x.shape}); the attention EOPs "
                f"{self.eops} need a multiple of dim_head={self.dim_head}"
            )

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B h w D"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]``.
          train: BN with batch statistics, updating the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn dropout and drop path off; None means ``not train``.

        Returns:
          ``[B, ceil(H / stride), ceil(W / stride), out_features]``.
        """
        self._validate(x)
        deterministic = not train if deterministic is None else deterministic
        c = x.shape[-1]
        c_mid = int(c * self.exp_ratio)
        skip = self.has_skip and self.stride == 1 and c == self.out_features
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)

        shortcut = x
        if self.norm == "bn":
            x = _batch_norm(self, train, "norm")(x)
        elif self.norm == "ln":
            x = nn.LayerNorm(NORM_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="norm")(x)  # fmt: skip
        ys = []
        for i, eop in enumerate(self.eops):
            if eop == "conv":
                y = _conv(self, c_mid, 1, c, f"eops_{i}", bias=self.qkv_bias)(x)
                ys.append(self.act(y))
            else:
                ys.append(
                    EWMHSA(c_mid, self.dim_head, self.window_size, eop, self.qkv_bias, self.act,
                           self.attn_drop, name=f"eops_{i}", **kw)(x, deterministic=deterministic)
                )  # fmt: skip
        x = functools.reduce(lambda a, b: a + b, ys)
        if self.dw_kernel > 0:
            x_l = ConvNormAct(c_mid, self.dw_kernel, self.stride, groups=c_mid, act=nn.silu,
                              name="conv_local", **kw)(x, train=train)  # fmt: skip
        else:
            x_l = x
        x = x + x_l if skip else x_l
        x = nn.Dropout(self.proj_drop, deterministic=deterministic)(x)
        x = _conv(self, self.out_features, 1, c_mid, "proj")(x)
        if self.ls_init > 0:
            gamma = self.param(
                "ls",
                nn.with_logical_partitioning(nn.initializers.constant(self.ls_init), ("channels",)),
                (self.out_features,),
                self.param_dtype,
            )
            x = x * gamma.astype(x.dtype).reshape(1, 1, 1, -1)
        if skip:
            x = shortcut + drop_path(self, x, self.drop_path, deterministic)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)
