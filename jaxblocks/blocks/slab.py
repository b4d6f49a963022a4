"""SLAB transformer block: simplified linear attention + progressive re-parameterized BN.

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.layers.attention import SimplifiedLinearAttention, simplified_linear_attention
from jaxblocks.layers.norm import PRepBN, fold_repbn_into_dense
from jaxblocks.layers.norm.repbn import repbn_affine
from jaxblocks.typing import Array, Float

__all__ = [
    "PVTSimplifiedLinearAttention",
    "SLABBlock",
    "SLABPVTBlock",
    "SLABSwinBlock",
    "SwinWindowAttention",
    "effective_window",
    "fold_repbn_into_conv_input",
    "fold_repbn_into_conv_output",
    "fold_slab_block",
    "fold_slab_pvt_block",
    "fold_slab_swin_block",
    "linear_resize_tokens",
    "shifted_window_mask",
    "swin_relative_position_index",
    "window_partition",
    "window_reverse",
]

Dtype = Any


class SLABBlock(nn.Module):
    """SLAB-DeiT block — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    A pre-norm ViT block whose token mixer is `SimplifiedLinearAttention` and whose norms are
    `PRepBN` (LayerNorm during early training, decaying to the foldable RepBN):
    ``x = x + SLA(norm1(x)); x = x + MLP(norm2(x))`` with MLP = Dense(r·C) → GELU (exact) →
    Dense(C). SLAB-DeiT-T uses C = 192, 3 heads, MLP ratio 4, depth 12, PRepBN over 60k steps,
    14×14 tokens (patch 16, no class token, average-pooled head).

    For deployment, `fold_slab_block` folds each norm's inference RepBN into the Dense after it
    (qkv and fc1); the folded variables run in ``deploy=True`` mode, which has no norms at all.

    ``norm`` is a factory for a module called as ``norm(x, use_running_average=..., step=...)``
    (`PRepBN` with its schedule; ``step`` is passed only when given); the block builds it as
    ``norm(dtype=..., param_dtype=..., ln_epsilon=..., name=...)``.

    LayerNorm ε (``ln_epsilon``): the official code (xinghaochen/SLAB ``classification/models``)
    uses 1e-6 for the DeiT variant (``slab_deit.py``: ``partial(nn.LayerNorm, eps=1e-6)`` in
    ``deit_*_patch16_224_linear_repbn``) — our default — and PyTorch's default 1e-5 for the Swin
    variant (``slab_swin.py``: ``ln = nn.LayerNorm``); pass ``ln_epsilon=1e-5`` for SLAB-Swin.
    ``ln_epsilon=None`` leaves the norm factory's own ε (`PRepBN`'s default is 1e-5). RepBN's
    BatchNorm ε is 1e-5 in both (``nn.BatchNorm1d``). Official code also differs in dropout /
    drop-path (omitted here); its BN momentum 0.1 is Flax decay 0.9, our `PRepBN` default.

    Attributes:
      num_heads: attention heads.
      mlp_ratio: MLP hidden size / C.
      qkv_bias: bias in the qkv projection (SLAB-DeiT: True).
      kernel_size: SLA's depth-wise conv kernel.
      norm: norm factory (default ``PRepBN(total_steps=60000)``).
      ln_epsilon: ε of the norms' LayerNorm (default 1e-6, SLAB-DeiT; 1e-5 for SLAB-Swin; None:
        the factory's own).
      deploy: folded inference mode (norms removed; use with `fold_slab_block`).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> blk = SLABBlock(num_heads=3)
      >>> x = jnp.ones((2, 16, 48))
      >>> v = blk.init(jax.random.key(0), x, train=True)
      >>> y, upd = blk.apply(v, x, train=True, mutable=["batch_stats"])
    """

    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    norm: Callable[..., nn.Module] = functools.partial(PRepBN, total_steps=60000)
    ln_epsilon: float | None = 1e-6
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        spatial_shape: tuple[int, int] | None = None,
        *,
        train: bool = False,
        step: Array | int | None = None,
    ) -> Float[Array, "B N C"]:
        c = x.shape[-1]
        dtype = self.dtype if self.dtype is not None else x.dtype
        kw = {} if step is None else {"step": step}
        if self.ln_epsilon is not None and not self.ln_epsilon > 0:
            raise ValueError(f"SLABBlock: ln_epsilon={self.ln_epsilon!r} must be > 0 or None")
        eps = {} if self.ln_epsilon is None else {"ln_epsilon": self.ln_epsilon}

        def norm(h, name):
            if self.deploy:
                return h
            return self.norm(dtype=dtype, param_dtype=self.param_dtype, name=name, **eps)(
                h, use_running_average=not train, **kw
            )

        # A folded norm leaves a bias in qkv even when qkv_bias is False: deploy keeps biases.
        attn = SimplifiedLinearAttention(
            num_heads=self.num_heads,
            qkv_bias=self.qkv_bias or self.deploy,
            kernel_size=self.kernel_size,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )
        x = x + attn(norm(x, "norm1"), spatial_shape)
        hidden = int(c * self.mlp_ratio)
        h = nn.Dense(hidden, dtype=dtype, param_dtype=self.param_dtype, name="fc1")(
            norm(x, "norm2")
        )
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(c, dtype=dtype, param_dtype=self.param_dtype, name="fc2")(h)
        return x + h


def fold_slab_block(variables: dict, epsilon: float = 1e-5) -> dict:
    """Fold a trained `SLABBlock`'s norms (their inference RepBN) into qkv and fc1.

    Returns ``{"params": ...}`` for ``SLABBlock(..., deploy=True)``; exact up to rounding
    (Dense after RepBN, no padding involved). Expects the default `PRepBN` norms (variables
    ``norm{1,2}/repbn``); ``epsilon`` must be the RepBN ε.
    """
    params = dict(variables["params"])
    stats = variables["batch_stats"]

    def repbn(name):
        return {"params": params[name]["repbn"], "batch_stats": stats[name]["repbn"]}

    attn = dict(params["attn"])
    attn["qkv"] = fold_repbn_into_dense(repbn("norm1"), attn["qkv"], epsilon)
    params["attn"] = attn
    params["fc1"] = fold_repbn_into_dense(repbn("norm2"), params["fc1"], epsilon)
    del params["norm1"], params["norm2"]
    return {"params": params}


def _norm_call(block: nn.Module, h: Array, name: str, dtype: Any, train: bool, step: Any) -> Array:
    """``block.norm`` (a `PRepBN` factory) applied to ``h``; identity in deploy mode."""
    if block.deploy:
        return h
    eps = {} if block.ln_epsilon is None else {"ln_epsilon": block.ln_epsilon}
    kw = {} if step is None else {"step": step}
    norm = block.norm(dtype=dtype, param_dtype=block.param_dtype, name=name, **eps)
    return norm(h, use_running_average=not train, **kw)


def _mlp(block: nn.Module, x: Array, dtype: Any) -> Array:
    """Official ``Mlp``: Dense(r·C) → GELU (exact) → Dense(C), names ``fc1``/``fc2``."""
    c = x.shape[-1]
    kw = dict(dtype=dtype, param_dtype=block.param_dtype)
    h = nn.Dense(int(c * block.mlp_ratio), name="fc1", **kw)(x)
    return nn.Dense(c, name="fc2", **kw)(nn.gelu(h, approximate=False))


# --------------------------------------------------------------------------- Swin windows


def window_partition(x: Float[Array, "B H W C"], window: int) -> Float[Array, "BnW w2 C"]:
    """Non-overlapping ``window × window`` windows, row-major: ``[B·nW, window², C]``."""
    b, h, w, c = x.shape
    if h % window or w % window:
        raise ValueError(f"window_partition: H, W = {(h, w)} must be multiples of {window}")
    x = x.reshape(b, h // window, window, w // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/w, W/w, w, w, C]
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Array, window: int, h: int, w: int) -> Float[Array, "B H W C"]:
    """Inverse of `window_partition`: ``[B·nW, window², C]`` → ``[B, h, w, C]``."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def effective_window(resolution: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
    """Official Swin rule: a window at least as large as the map covers it, unshifted."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """Swin's SW-MSA mask ``[nW, window², window²]``: 0 within a region, -100 across."""
    img = np.zeros((h, w), np.float32)
    cnt = 0
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in slices:
        for ws in slices:
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)  # [nW, w²], the order of window_partition
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def swin_relative_position_index(window: int) -> np.ndarray:
    """``[window², window²]`` index into the ``(2w-1)²`` relative-position table (official)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    flat = coords.reshape(2, -1)  # [2, w²]
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class SwinWindowAttention(nn.Module):
    """Softmax window attention of Swin (Liu et al. 2021, https://arxiv.org/abs/2103.14030).

    The softmax token mixer of SLAB-Swin's late stages (official ``slab_swin.py``
    ``WindowAttention``): ``softmax(q·kᵀ/√d + B_rel + mask)·v`` per window, with a learned
    relative-position bias table ``[(2w-1)², H]`` (init N(0, 0.02), truncated in the official
    code) and the shifted-window mask; qkv and proj Dense layers.

    Attributes:
      num_heads: heads; window: window side (tokens per window = window²).
      qkv_bias: bias of the qkv projection.
      dtype, param_dtype: compute and parameter dtypes (softmax in fp32).
    """

    num_heads: int
    window: int
    qkv_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B N C"], mask: Array | None = None) -> Array:
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        dtype = self.dtype if self.dtype is not None else x.dtype
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, name="qkv", **kw)(x)
        q, k, v = (a.reshape(b, n, heads, d) for a in jnp.split(qkv, 3, axis=-1))
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * self.window - 1) ** 2, heads),
            self.param_dtype,
        )
        idx = swin_relative_position_index(self.window).reshape(-1)
        bias = table[idx].reshape(n, n, heads).transpose(2, 0, 1)  # [H, N, N]
        logits = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32))
        logits = logits * d**-0.5 + bias[None].astype(jnp.float32)
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(b // nw, nw, heads, n, n) + mask[None, :, None]
            logits = logits.reshape(b, heads, n, n)
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhij,bjhd->bihd", attn, v.astype(jnp.float32)).reshape(b, n, c)
        return nn.Dense(c, name="proj", **kw)(out.astype(dtype))


class SLABSwinBlock(nn.Module):
    """SLAB-Swin block — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    A Swin block (cyclic shift → window partition → token mixer → reverse) whose norms are
    `PRepBN` and whose token mixer is `SimplifiedLinearAttention` per window (``attn_type="L"``,
    positional encoding ``[window², C]``, DWC on each window) or Swin's softmax
    `SwinWindowAttention` (``attn_type="S"``). Official ``slab_swin.py``: when the map is no
    larger than the window, the window shrinks to the map and the shift is dropped
    (`effective_window`); SLA ignores the shifted-window mask (the official SLA takes ``mask``
    but does not use it), softmax attention applies it. LayerNorm ε 1e-5 (``nn.LayerNorm``).

    Attributes:
      num_heads, window_size, shift_size: as in Swin (before `effective_window`).
      input_resolution: token grid ``(H, W)`` (fixed, as the official block).
      attn_type: ``"L"`` (SLA) or ``"S"`` (softmax window attention).
      mlp_ratio, qkv_bias, kernel_size, norm, ln_epsilon, deploy, dtype, param_dtype: as in
        `SLABBlock`.
    """

    num_heads: int
    input_resolution: tuple[int, int]
    window_size: int = 7
    shift_size: int = 0
    attn_type: str = "L"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    norm: Callable[..., nn.Module] = functools.partial(PRepBN, total_steps=60000)
    ln_epsilon: float | None = 1e-5
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        *,
        train: bool = False,
        step: Array | int | None = None,
    ) -> Float[Array, "B N C"]:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(
                f"SLABSwinBlock: x has {n} tokens (shape {x.shape}); input_resolution "
                f"{self.input_resolution} expects {h * w}"
            )
        if self.attn_type not in ("L", "S"):
            raise ValueError(f"SLABSwinBlock: attn_type={self.attn_type!r} must be 'L' or 'S'")
        window, shift = effective_window((h, w), self.window_size, self.shift_size)
        if not 0 <= shift < window:
            raise ValueError(f"SLABSwinBlock: shift_size={shift} must be in [0, {window})")
        dtype = self.dtype if self.dtype is not None else x.dtype
        y = _norm_call(self, x, "norm1", dtype, train, step).reshape(b, h, w, c)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        win = window_partition(y, window)  # [B·nW, window², C]
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, name="attn")
        qkv_bias = self.qkv_bias or self.deploy
        if self.attn_type == "L":
            mixer = SimplifiedLinearAttention(
                self.num_heads, qkv_bias=qkv_bias, kernel_size=self.kernel_size, **kw
            )
            win = mixer(win, (window, window))
        else:
            mask = jnp.asarray(shifted_window_mask(h, w, window, shift)) if shift else None
            win = SwinWindowAttention(self.num_heads, window, qkv_bias=qkv_bias, **kw)(win, mask)
        y = window_reverse(win, window, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + _mlp(self, _norm_call(self, x, "norm2", dtype, train, step), dtype)


# --------------------------------------------------------------------------- PVT


def linear_resize_tokens(v: Float[Array, "B S C"], n: int) -> Float[Array, "B N C"]:
    """1-D linear resize of the token axis, as ``F.interpolate(mode="linear")`` (half-pixel
    centres, ``align_corners=False``, source index clamped at 0)."""
    s = v.shape[1]
    src = np.maximum((np.arange(n) + 0.5) * (s / n) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), s - 1)
    i1 = np.minimum(i0 + 1, s - 1)
    lam = jnp.asarray((src - i0)[None, :, None], jnp.float32)
    out = v[:, i0].astype(jnp.float32) * (1.0 - lam) + v[:, i1].astype(jnp.float32) * lam
    return out.astype(v.dtype)


class PVTSimplifiedLinearAttention(nn.Module):
    """SLA with PVT's spatial reduction — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    Official ``slab_pvt.py`` ``SimplifiedLinearAttention``: ``q = Dense(x)``; keys/values from
    ``x`` or, for ``sr_ratio > 1``, from a strided ``sr×sr`` conv of the token grid followed by a
    norm (``norm``, a `PRepBN` in SLAB-PVT); ``kv = Dense(2C)``; a learned positional encoding
    ``[N/sr², C]`` added to K; ReLU kernel; no fp32 autocast guard in the official PVT variant
    (we still compute the core in fp32). The DWC acts on V resized back to N tokens by a 1-D
    linear interpolation over the flattened token axis (the official ``F.interpolate(...,
    mode="linear")``), reshaped to a square grid (the official code requires one).

    Attributes:
      num_heads, sr_ratio, qkv_bias, kernel_size: as in the official module.
      norm, ln_epsilon, deploy: the sr norm (see `SLABPVTBlock`).
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_heads: int
    sr_ratio: int = 1
    qkv_bias: bool = True
    kernel_size: int = 5
    norm: Callable[..., nn.Module] = functools.partial(PRepBN, total_steps=300000)
    ln_epsilon: float | None = 1e-6
    deploy: bool = False
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        spatial_shape: tuple[int, int],
        *,
        train: bool = False,
        step: Array | int | None = None,
    ) -> Float[Array, "B N C"]:
        b, n, c = x.shape
        h, w = spatial_shape
        if h * w != n or h != w:
            raise ValueError(f"PVTSimplifiedLinearAttention: spatial_shape {spatial_shape} must "
                             f"be square with h·w = N = {n} (official DWC reshape)")  # fmt: skip
        if c % self.num_heads:
            raise ValueError(f"PVTSimplifiedLinearAttention: num_heads={self.num_heads} must "
                             f"divide C={c}")  # fmt: skip
        heads, d = self.num_heads, c // self.num_heads
        dtype = self.dtype if self.dtype is not None else x.dtype
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        bias = self.qkv_bias or self.deploy
        q = nn.Dense(c, use_bias=bias, name="q", **kw)(x)
        src = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            if h % r or w % r:
                raise ValueError(f"PVTSimplifiedLinearAttention: grid {spatial_shape} must be "
                                 f"divisible by sr_ratio={r}")  # fmt: skip
            img = nn.Conv(c, (r, r), strides=(r, r), padding="VALID", name="sr", **kw)(
                x.reshape(b, h, w, c)
            )
            src = _norm_call(self, img.reshape(b, -1, c), "norm", dtype, train, step)
        kv = nn.Dense(2 * c, use_bias=bias, name="kv", **kw)(src)
        k, v = jnp.split(kv, 2, axis=-1)  # [B, S, C]
        s = k.shape[1]
        pos = self.param("pos_emb", nn.initializers.zeros, (s, c), self.param_dtype)
        k = k + pos[None].astype(k.dtype)
        q, k = jax.nn.relu(q), jax.nn.relu(k)
        q4, k4, v4 = q.reshape(b, n, heads, d), k.reshape(b, s, heads, d), v.reshape(b, s, heads, d)
        out = simplified_linear_attention(q4, k4, v4, epsilon=self.epsilon).astype(dtype)
        if s != n:
            v = linear_resize_tokens(v, n)
        v_img = v.reshape(b, h, w, heads, d).transpose(0, 3, 1, 2, 4).reshape(b * heads, h, w, d)
        dwc = nn.Conv(
            d, (self.kernel_size,) * 2, padding="SAME", feature_group_count=d, name="dwc", **kw
        )(v_img)
        dwc = dwc.reshape(b, heads, n, d).transpose(0, 2, 1, 3)  # [B, N, H, D]
        out = (out + dwc).reshape(b, n, c)
        return nn.Dense(c, name="proj", **kw)(out)


class SLABPVTBlock(nn.Module):
    """SLAB-PVT block — Guo et al. 2024, https://arxiv.org/abs/2405.11582.

    ``x = x + PVT-SLA(norm1(x)); x = x + MLP(norm2(x))`` (official ``slab_pvt.py`` ``Block``
    with ``attn_type="L"``), norms `PRepBN` with LayerNorm ε 1e-6 and the official PVT schedule
    of 300k steps (``LinearNorm``'s default; ``slab_pvt.py`` does not override it).

    Attributes:
      num_heads, sr_ratio, mlp_ratio, qkv_bias, kernel_size: official block arguments.
      norm, ln_epsilon, deploy, dtype, param_dtype: as in `SLABBlock`.
    """

    num_heads: int
    sr_ratio: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 5
    norm: Callable[..., nn.Module] = functools.partial(PRepBN, total_steps=300000)
    ln_epsilon: float | None = 1e-6
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        spatial_shape: tuple[int, int],
        *,
        train: bool = False,
        step: Array | int | None = None,
    ) -> Float[Array, "B N C"]:
        dtype = self.dtype if self.dtype is not None else x.dtype
        attn = PVTSimplifiedLinearAttention(
            self.num_heads,
            sr_ratio=self.sr_ratio,
            qkv_bias=self.qkv_bias,
            kernel_size=self.kernel_size,
            norm=self.norm,
            ln_epsilon=self.ln_epsilon,
            deploy=self.deploy,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )
        h = _norm_call(self, x, "norm1", dtype, train, step)
        x = x + attn(h, spatial_shape, train=train, step=step)
        return x + _mlp(self, _norm_call(self, x, "norm2", dtype, train, step), dtype)


# --------------------------------------------------------------------------- folds


def _repbn_vars(variables: dict, name: str) -> dict:
    return {
        "params": variables["params"][name]["repbn"],
        "batch_stats": variables["batch_stats"][name]["repbn"],
    }


def fold_repbn_into_conv_output(repbn_variables: dict, conv_params: dict, epsilon: float = 1e-5):
    """Fold an inference RepBN that follows a conv: ``RepBN(conv(x)) = conv'(x)`` (exact).

    Flax kernel ``[..., C_in, C_out]``: ``kernel' = kernel·a``, ``bias' = a·bias + b``.
    """
    a, b = repbn_affine(repbn_variables, epsilon)
    k = conv_params["kernel"]
    bias = conv_params.get("bias")
    new_bias = b if bias is None else a * bias.astype(jnp.float32) + b
    return {
        **conv_params,
        "kernel": (k.astype(jnp.float32) * a.reshape((1,) * (k.ndim - 1) + (-1,))).astype(k.dtype),
        "bias": new_bias.astype(k.dtype if bias is None else bias.dtype),
    }


def fold_repbn_into_conv_input(repbn_variables: dict, conv_params: dict, epsilon: float = 1e-5):
    """Fold an inference RepBN before an unpadded (VALID) conv: ``conv(RepBN(x)) = conv'(x)``.

    ``kernel'[..., i, o] = a_i·kernel[..., i, o]``, ``bias' = bias + Σ b_i·kernel[..., i, o]``;
    exact only without padding (a padded border would see ``0`` instead of ``b``).
    """
    a, b = repbn_affine(repbn_variables, epsilon)
    k = conv_params["kernel"]
    k32 = k.astype(jnp.float32)
    new_bias = jnp.einsum("...io,i->o", k32, b)
    if "bias" in conv_params:
        new_bias = new_bias + conv_params["bias"].astype(jnp.float32)
    return {
        **conv_params,
        "kernel": (k32 * a.reshape((1,) * (k.ndim - 2) + (-1, 1))).astype(k.dtype),
        "bias": new_bias.astype(conv_params.get("bias", k).dtype),
    }


def fold_slab_swin_block(variables: dict, epsilon: float = 1e-5) -> dict:
    """Fold a `SLABSwinBlock`'s norms into ``attn/qkv`` and ``fc1``: ``{"params": ...}`` for
    ``deploy=True``. The windowing between norm1 and qkv only moves tokens, so the per-channel
    RepBN affine commutes with it and the fold is exact."""
    params = dict(variables["params"])
    attn = dict(params["attn"])
    attn["qkv"] = fold_repbn_into_dense(_repbn_vars(variables, "norm1"), attn["qkv"], epsilon)
    params["attn"] = attn
    params["fc1"] = fold_repbn_into_dense(_repbn_vars(variables, "norm2"), params["fc1"], epsilon)
    del params["norm1"], params["norm2"]
    return {"params": params}


def fold_slab_pvt_block(variables: dict, epsilon: float = 1e-5) -> dict:
    """Fold a `SLABPVTBlock`'s norms: norm1 into ``attn/q`` and ``attn/kv`` (or the unpadded
    ``attn/sr`` conv), the sr norm into ``attn/kv``, norm2 into ``fc1``. Exact."""
    params = dict(variables["params"])
    attn = dict(params["attn"])
    n1 = _repbn_vars(variables, "norm1")
    attn["q"] = fold_repbn_into_dense(n1, attn["q"], epsilon)
    if "sr" in attn:
        attn["sr"] = fold_repbn_into_conv_input(n1, attn["sr"], epsilon)
        nsr = _repbn_vars({"params": attn, "batch_stats": variables["batch_stats"]["attn"]}, "norm")
        attn["kv"] = fold_repbn_into_dense(nsr, attn["kv"], epsilon)
        del attn["norm"]
    else:
        attn["kv"] = fold_repbn_into_dense(n1, attn["kv"], epsilon)
    params["attn"] = attn
    params["fc1"] = fold_repbn_into_dense(_repbn_vars(variables, "norm2"), params["fc1"], epsilon)
    del params["norm1"], params["norm2"]
    return {"params": params}
