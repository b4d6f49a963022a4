"""UniRepLKNet blocks: the Dilated Reparam Block, GRN, SE and the UniRepLKNet block, with the
structural re-parameterisation that turns a trained block into its inference form.

Ding, Zhang, Yue, Zhang, Shan, Ma, Li, "UniRepLKNet: A Universal Perception Large-Kernel ConvNet
for Audio, Video, Point Cloud, Time-Series and Image Recognition",
https://arxiv.org/abs/2311.15599; journal version "Scaling Up Your Kernels: Large Kernel Design
in ConvNets towards Universal Representations", https://arxiv.org/abs/2410.08049. Official code:
AILab-CVC/UniRepLKNet ``unireplknet.py``.

Channels-last throughout: ``[B, H, W, C]`` with ``spatial_dims=2`` (images, spectrograms) and
``[B, T, C]`` with ``spatial_dims=1`` (time series, audio waveforms embedded as sequences).

Module and parameter names follow the official state dict where Flax allows:
``dwconv/lk_origin``, ``dwconv/origin_bn``, ``dwconv/dil_conv_k7_2``, ``dwconv/dil_bn_k7_2``,
``norm``, ``se/down``, ``se/up``, ``gamma``; the official Sequential indices are named:
``pwconv1.1`` -> ``pwconv1``, ``act.1`` -> ``grn``, ``pwconv2.0`` -> ``pwconv2``, ``pwconv2.2``
-> ``pwconv2_bn``. Re-parameterisation is pure functions on variable trees
(`merge_dilated_branches`, `reparameterize_block`, `reparameterize`), whose output is the
variables of the same module built with ``deploy=True``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxblocks.layers.conv_bn import fold
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "DILATED_REPARAM_BRANCHES",
    "GRN",
    "DilatedReparamBlock",
    "SEBlock",
    "UniRepLKNetBlock",
    "dilate_kernel",
    "dilated_reparam_branches",
    "global_response_norm",
    "merge_dilated_branches",
    "pad_kernel_to",
    "reparameterize",
    "reparameterize_block",
]

Dtype = Any
# The official code initialises every conv and linear weight with trunc_normal(std=0.02) and
# zero biases (torch truncates at +-2 absolute, i.e. +-100 std; Flax at +-2 std: immaterial).
default_kernel_init = nn.initializers.truncated_normal(0.02)
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm2d momentum 0.1
BN_EPSILON = 1e-5  # torch's BatchNorm2d default, used by UniRepLKNet
GRN_EPSILON = 1e-6  # GRNwithNHWC: Gx / (mean_c Gx + 1e-6)

# (small kernel k_i, dilation r_i) of the parallel branches of a Dilated Reparam Block with
# large kernel k: the official ``DilatedReparamBlock.__init__`` table ("default settings, not
# tuned carefully"). Each branch's equivalent kernel r_i (k_i - 1) + 1 is at most k.
DILATED_REPARAM_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
_BRANCH_NAME = re.compile(r"^dil_conv_k(\d+)_(\d+)$")


def dilated_reparam_branches(kernel_size: int) -> tuple[tuple[int, int], ...]:
    """The official ``(kernel, dilation)`` branches of a Dilated Reparam Block of size k."""
    if kernel_size not in DILATED_REPARAM_BRANCHES:
        raise ValueError(
            f"DilatedReparamBlock: kernel_size={kernel_size!r} has no official branch table; "
            f"supported kernel sizes are {sorted(DILATED_REPARAM_BRANCHES)}"
        )
    return DILATED_REPARAM_BRANCHES[kernel_size]


def _dw_axes(spatial_dims: int) -> tuple[str | None, ...]:
    """Logical axis names of a depthwise kernel ``[*k, 1, C]``."""
    return (None,) * (spatial_dims + 1) + ("conv_out",)


def _check_input(where: str, x: Array, spatial_dims: int) -> None:
    if spatial_dims not in (1, 2):
        raise ValueError(f"{where}: spatial_dims must be 1 or 2, got {spatial_dims!r}")
    if x.ndim != spatial_dims + 2:
        layout = "[B, T, C]" if spatial_dims == 1 else "[B, H, W, C]"
        raise ValueError(
            f"{where}: x must be {layout} ({spatial_dims + 2}-D) for spatial_dims={spatial_dims}, "
            f"got shape {x.shape}"
        )


# ----------------------------------------------------------------------------------------------
# Pure math.


def global_response_norm(
    x: Float[Array, "B *S C"],
    gamma: Float[Array, " C"],
    beta: Float[Array, " C"] | None = None,
    epsilon: float = GRN_EPSILON,
) -> Float[Array, "B *S C"]:
    """Global Response Normalization (ConvNeXt V2, https://arxiv.org/abs/2301.00808).

    ``G = ||x||_2`` over the spatial axes per (sample, channel), ``N = G / (mean_C G + eps)``,
    output ``(gamma * N + 1) * x + beta`` (UniRepLKNet's ``GRNwithNHWC``; eps 1e-6 added to the
    channel mean, not to the norm). Statistics in fp32; the result has ``x``'s dtype.
    """
    spatial = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(jnp.square(x32), axis=spatial, keepdims=True))  # [B, 1.., C]
    n = g / (jnp.mean(g, axis=-1, keepdims=True) + epsilon)
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    y = (gamma.astype(jnp.float32).reshape(shape) * n + 1.0) * x32
    if beta is not None:
        y = y + beta.astype(jnp.float32).reshape(shape)
    return y.astype(x.dtype)


def dilate_kernel(kernel: Float[Array, "*K I C"], rate: int) -> Float[Array, "*E I C"]:
    """The dense kernel equal to ``kernel`` applied with dilation ``rate``: ``rate - 1`` zeros
    between neighbouring taps along each spatial axis, size ``rate (k - 1) + 1``.

    The official code gets the same array from a transposed conv with stride ``rate`` and a 1x1
    identity kernel (``convert_dilated_to_nondilated``).
    """
    if not isinstance(rate, int) or rate < 1:
        raise ValueError(f"dilate_kernel: rate must be an int >= 1, got {rate!r}")
    spatial = kernel.ndim - 2
    if rate == 1:
        return kernel
    shape = tuple(rate * (k - 1) + 1 for k in kernel.shape[:spatial]) + kernel.shape[spatial:]
    index = (slice(None, None, rate),) * spatial
    return jnp.zeros(shape, kernel.dtype).at[index].set(kernel)


def pad_kernel_to(kernel: Float[Array, "*K I C"], size: int) -> Float[Array, "*S I C"]:
    """Zero-pad an odd kernel symmetrically to ``size`` along every spatial axis (centres
    aligned, as the official ``merge_dilated_into_large_kernel``)."""
    spatial = kernel.ndim - 2
    pads = []
    for k in kernel.shape[:spatial]:
        if k % 2 == 0 or k > size:
            raise ValueError(
                f"pad_kernel_to: kernel of spatial shape {kernel.shape[:spatial]} cannot be "
                f"centred in size {size}; expected odd sizes <= {size}"
            )
        pads.append(((size - k) // 2, (size - k) // 2))
    return jnp.pad(kernel, pads + [(0, 0), (0, 0)])


def merge_dilated_branches(
    variables: Mapping[str, Any], *, epsilon: float = BN_EPSILON
) -> tuple[Array, Array]:
    """Fuse a trained Dilated Reparam Block into one depthwise conv (UniRepLKNet,
    https://arxiv.org/abs/2311.15599, Sec. 3 and the official ``merge_dilated_branches``).

    Each BatchNorm (running statistics) is folded into its conv, each small kernel is dilated
    (`dilate_kernel`), zero-padded to the large size (`pad_kernel_to`) and summed with the large
    kernel; the biases add up. Exact in real arithmetic for stride-1 "same" convs.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of one `DilatedReparamBlock` in train
        form (``lk_origin``, ``origin_bn``, ``dil_conv_k{k}_{r}``, ``dil_bn_k{k}_{r}``); the
        dilations are read from the branch names.
      epsilon: the BatchNorms' epsilon.

    Returns:
      ``(kernel [*k, 1, C], bias [C])`` in fp32: ``lk_origin``'s variables in deploy form.
    """
    variables = nn.unbox(dict(variables))
    params, stats = variables.get("params"), variables.get("batch_stats")
    if params is None or "lk_origin" not in params:
        raise ValueError(
            "merge_dilated_branches: variables must be {'params': ..., 'batch_stats': ...} of "
            f"one DilatedReparamBlock (with 'lk_origin'), got keys {sorted(variables)}"
        )
    if "origin_bn" not in params or stats is None:
        raise ValueError(
            "merge_dilated_branches: no 'origin_bn' params or no 'batch_stats': the block is "
            "already in deploy form (one conv with bias), or the batch statistics are missing"
        )

    def fused(conv: str, bn: str) -> tuple[Array, Array]:
        p, s = params[bn], stats[bn]
        return fold(params[conv]["kernel"], p["scale"], p["bias"], s["mean"], s["var"],
                    params[conv].get("bias"), epsilon=epsilon)  # fmt: skip

    kernel, bias = fused("lk_origin", "origin_bn")
    size = kernel.shape[0]
    for name in sorted(params):
        match = _BRANCH_NAME.match(name)
        if match is None:
            continue
        rate = int(match.group(2))
        k_i, b_i = fused(name, name.replace("dil_conv", "dil_bn"))
        kernel = kernel + pad_kernel_to(dilate_kernel(k_i, rate), size)
        bias = bias + b_i
    return kernel, bias


def _is_dilated_reparam(params: Any) -> bool:
    return isinstance(params, Mapping) and "lk_origin" in params and "origin_bn" in params


def _is_unireplknet_block(params: Any) -> bool:
    return isinstance(params, Mapping) and {"pwconv1", "grn", "pwconv2", "se"} <= set(params)


def reparameterize_block(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, epsilon: float = BN_EPSILON
) -> dict[str, Any]:
    """Deploy-form params of one trained `UniRepLKNetBlock` (official ``reparameterize``).

    1. the Dilated Reparam Block is merged (`merge_dilated_branches`), or the plain depthwise
       conv taken as is; 2. the BatchNorm after it (``norm``) is folded into that conv;
    3. GRN's ``beta`` is pushed through ``pwconv2`` (``beta @ W``) into a bias; 4. the
    BatchNorm after ``pwconv2`` and the layer scale ``gamma`` are folded into ``pwconv2``.
    SE, ``pwconv1`` and GRN's ``gamma`` are unchanged. The block then has no ``batch_stats``.

    Args:
      params, batch_stats: the block's collections (train form, running statistics).
      epsilon: the BatchNorms' epsilon.

    Returns:
      The params of the same block built with ``deploy=True`` (fp32 where fused).
    """
    params, batch_stats = nn.unbox(dict(params)), nn.unbox(dict(batch_stats))
    if "pwconv2_bn" not in params:
        raise ValueError(
            "reparameterize_block: params have no 'pwconv2_bn': the block is already in deploy "
            f"form or is not a UniRepLKNetBlock (keys {sorted(params)})"
        )
    out: dict[str, Any] = {k: params[k] for k in ("se", "pwconv1") if k in params}
    if "dwconv" in params:  # kernel_size 0 has neither a conv nor its norm
        dw = params["dwconv"]
        if _is_dilated_reparam(dw):
            kernel, bias = merge_dilated_branches(
                {"params": dw, "batch_stats": batch_stats["dwconv"]}, epsilon=epsilon
            )
        else:
            kernel, bias = dw["kernel"], dw.get("bias")
        n, s = params["norm"], batch_stats["norm"]
        kernel, bias = fold(kernel, n["scale"], n["bias"], s["mean"], s["var"], bias,
                            epsilon=epsilon)  # fmt: skip
        out["dwconv"] = (
            {"lk_origin": {"kernel": kernel, "bias": bias}}
            if _is_dilated_reparam(dw)
            else {"kernel": kernel, "bias": bias}
        )
    out["grn"] = {"gamma": params["grn"]["gamma"]}
    w = params["pwconv2"]["kernel"].astype(jnp.float32)  # [4C, C]
    lin_bias = jnp.zeros((w.shape[1],), jnp.float32)
    if "beta" in params["grn"]:
        lin_bias = lin_bias + jnp.dot(
            params["grn"]["beta"].astype(jnp.float32), w, precision=lax.Precision.HIGHEST
        )
    n, s = params["pwconv2_bn"], batch_stats["pwconv2_bn"]
    w, b = fold(w, n["scale"], n["bias"], s["mean"], s["var"], lin_bias, epsilon=epsilon)
    if "gamma" in params:
        scale = params["gamma"].astype(jnp.float32)
        w, b = w * scale.reshape(1, -1), b * scale
    out["pwconv2"] = {"kernel": w, "bias": b}
    return out


def reparameterize(variables: Mapping[str, Any], *, epsilon: float = BN_EPSILON) -> dict[str, Any]:
    """Deploy-form variables of a trained UniRepLKNet model, stage or block (UniRepLKNet,
    https://arxiv.org/abs/2311.15599; the official ``reparameterize_unireplknet``).

    Walks the ``params`` tree: every `UniRepLKNetBlock` is replaced by `reparameterize_block`,
    every standalone `DilatedReparamBlock` by `merge_dilated_branches`; everything else is kept.
    The result is meant for the same module built with ``deploy=True``; its ``batch_stats``
    keep only the statistics of other layers (none for UniRepLKNet models; the collection is
    dropped when empty). The model's outputs with ``train=False`` are unchanged up to rounding.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (boxed or unboxed).
      epsilon: the BatchNorms' epsilon.

    Returns:
      ``{"params": ..., ["batch_stats": ...,] other collections unchanged}``.
    """
    variables = nn.unbox(dict(variables))
    if "params" not in variables:
        raise ValueError(f"reparameterize: variables have no 'params' (keys {sorted(variables)})")
    stats_all = variables.get("batch_stats", {})

    def walk(params: Any, stats: Any) -> tuple[Any, Any]:
        if not isinstance(params, Mapping):
            return params, stats
        if _is_unireplknet_block(params) and "pwconv2_bn" in params:
            return reparameterize_block(params, stats, epsilon=epsilon), None
        if _is_dilated_reparam(params):
            kernel, bias = merge_dilated_branches(
                {"params": params, "batch_stats": stats}, epsilon=epsilon
            )
            return {"lk_origin": {"kernel": kernel, "bias": bias}}, None
        new_params, new_stats = {}, {}
        for name, child in params.items():
            child_stats = stats.get(name, {}) if isinstance(stats, Mapping) else {}
            new_params[name], s = walk(child, child_stats)
            if s:
                new_stats[name] = s
        # Statistics of modules without params of the same name are kept as they are.
        if isinstance(stats, Mapping):
            for name, s in stats.items():
                if name not in params:
                    new_stats[name] = s
        return new_params, new_stats

    params, stats = walk(variables["params"], stats_all)
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out


# ----------------------------------------------------------------------------------------------
# Modules.


class GRN(nn.Module):
    """Global Response Normalization, channels last (ConvNeXt V2,
    https://arxiv.org/abs/2301.00808, as UniRepLKNet's ``GRNwithNHWC``,
    https://arxiv.org/abs/2311.15599).

    ``(gamma * N(x) + 1) * x + beta`` with ``N`` the spatial L2 norm divided by its channel
    mean (`global_response_norm`); ``gamma`` and ``beta`` start at zero, so it starts as the
    identity. Any number of spatial axes (``[B, H, W, C]``, ``[B, T, C]``).

    Attributes:
      use_bias: keep ``beta`` (the deploy form drops it: it is folded into the next Linear).
      epsilon: added to the channel mean of the norms (1e-6).
      param_dtype: parameter dtype.
    """

    use_bias: bool = True
    epsilon: float = GRN_EPSILON
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        if x.ndim < 3:
            raise ValueError(f"GRN: x must be [B, *spatial, C] with a spatial axis, got {x.shape}")
        c = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
        gamma = self.param("gamma", init, (c,), self.param_dtype)
        beta = self.param("beta", init, (c,), self.param_dtype) if self.use_bias else None
        return global_response_norm(x, gamma, beta, self.epsilon)


class SEBlock(nn.Module):
    """Squeeze-and-Excitation as in UniRepLKNet's ``SEBlock`` (SENet,
    https://arxiv.org/abs/1709.01507; UniRepLKNet, https://arxiv.org/abs/2311.15599).

    Spatial mean -> ``down`` (C -> ``internal``, bias) -> ReLU -> ``up`` (-> C, bias) ->
    sigmoid -> ``x * gate``. Unlike `jaxblocks.layers.squeeze_excite.SqueezeExcite` both
    projections have biases, as the official 1x1 convs. They are Dense layers on the pooled
    ``[B, C]`` (a torch 1x1 conv weight ``[O, I, 1, 1]`` maps to ``kernel = w[:, :, 0, 0].T``).

    Attributes:
      internal: hidden width (None: ``C // 4``, the official ``SEBlock(dim, dim // 4)``).
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initializers.
    """

    internal: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        if x.ndim < 3:
            raise ValueError(
                f"SEBlock: x must be [B, *spatial, C] with a spatial axis, got shape {x.shape}"
            )
        c = x.shape[-1]
        hidden = c // 4 if self.internal is None else self.internal
        if hidden < 1:
            raise ValueError(
                f"SEBlock: {c} channels give a hidden width of {hidden}; expected >= 1 "
                "(C >= 4 with the default C // 4)"
            )
        dtype = self.dtype or x.dtype
        dense = lambda f, name, axes: nn.Dense(
            f,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=self.bias_init,
            name=name,
        )
        spatial = tuple(range(1, x.ndim - 1))
        s = jnp.mean(x.astype(jnp.float32), axis=spatial).astype(dtype)  # [B, C]
        s = dense(hidden, "down", ("channels", "mlp"))(s)
        s = dense(c, "up", ("mlp", "channels"))(nn.relu(s))
        gate = nn.sigmoid(s).reshape((x.shape[0],) + (1,) * len(spatial) + (c,))
        return x.astype(dtype) * gate.astype(dtype)


class DilatedReparamBlock(nn.Module):
    """Dilated Reparam Block (UniRepLKNet, https://arxiv.org/abs/2311.15599).

    A large depthwise kernel k plus parallel small *dilated* depthwise kernels, each followed by
    its own BatchNorm, summed: ``BN(DW_k(x)) + sum_i BN(DW_{k_i, dilation r_i}(x))`` with the
    official branch table `DILATED_REPARAM_BRANCHES` (e.g. k=13: (5,1), (7,2), (3,3), (3,4),
    (3,5)). The dilated branches see sparse, far-apart pixels, which the paper shows helps a
    large kernel; after training they are folded into one k x k depthwise conv with bias
    (`merge_dilated_branches`), which is this module with ``deploy=True``. Padding keeps the
    size (stride 1). With ``spatial_dims=1`` the same block runs along T of ``[B, T, C]``.

    BatchNorm follows `flax.linen.BatchNorm` (momentum 0.9 = torch's 0.1, biased running
    variance where torch keeps the unbiased one; the normalised outputs are the same).

    Attributes:
      kernel_size: the large kernel k, a key of `DILATED_REPARAM_BRANCHES` (5 ... 17, odd).
      spatial_dims: 2 for ``[B, H, W, C]``, 1 for ``[B, T, C]``.
      deploy: the inference form, one depthwise k-conv with bias (``lk_origin``).
      bn_momentum, bn_epsilon: of the BatchNorms (Flax semantics).
      dtype, param_dtype, kernel_init: compute/parameter dtypes and kernel initializer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = DilatedReparamBlock(kernel_size=7)
      >>> x = jnp.ones((2, 9, 9, 8))
      >>> variables = block.init(jax.random.key(0), x)
      >>> deploy = DilatedReparamBlock(kernel_size=7, deploy=True)
      >>> kernel, bias = merge_dilated_branches(variables)
      >>> y = deploy.apply({"params": {"lk_origin": {"kernel": kernel, "bias": bias}}}, x)
    """

    kernel_size: int = 13
    spatial_dims: int = 2
    deploy: bool = False
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"], *, train: bool = False) -> Float[Array, "B *S C"]:
        """Apply the block; ``train`` normalises with batch statistics (mutable batch_stats)."""
        _check_input("DilatedReparamBlock", x, self.spatial_dims)
        branches = dilated_reparam_branches(self.kernel_size)
        c, d = x.shape[-1], self.spatial_dims

        def dwconv(k: int, rate: int, use_bias: bool, name: str) -> nn.Conv:
            pad = rate * (k - 1) // 2
            return nn.Conv(
                c,
                (k,) * d,
                padding=((pad, pad),) * d,
                kernel_dilation=(rate,) * d,
                feature_group_count=c,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, _dw_axes(d)),
                name=name,
            )

        if self.deploy:
            return dwconv(self.kernel_size, 1, True, "lk_origin")(x)
        bn = lambda name: nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        out = bn("origin_bn")(dwconv(self.kernel_size, 1, False, "lk_origin")(x))
        for k, r in branches:
            out = out + bn(f"dil_bn_k{k}_{r}")(dwconv(k, r, False, f"dil_conv_k{k}_{r}")(x))
        return out


class UniRepLKNetBlock(nn.Module):
    """UniRepLKNet block (Ding et al., https://arxiv.org/abs/2311.15599).

    ``x + DropPath(gamma * BN(Linear_{4C->C}(GRN(GELU(Linear_{C->4C}(SE(BN(dw(x)))))))))``,
    as the official ``UniRepLKNetBlock``: ``dw`` is a `DilatedReparamBlock` for kernel sizes
    >= 7, a plain depthwise conv (no bias) for 3 and 5, nothing for 0 (and then no BN either);
    SE (`SEBlock`, C -> C/4) gates the channels; the FFN is ConvNeXt V2's (GELU + `GRN`) with a
    bias-free second Linear followed by BatchNorm; the layer scale ``gamma`` starts at 1e-6.
    Compared with ConvNeXt: BatchNorm instead of LayerNorm (so it folds away), the SE and the
    dilated large kernel. ``deploy=True`` builds the inference form `reparameterize_block`
    produces: ``dwconv`` with bias and no BN, GRN without ``beta``, ``pwconv2`` with bias, no
    BN, no ``gamma``.

    ``spatial_dims=1`` applies the same block to sequences ``[B, T, C]`` (the paper's
    time-series and audio use) with 1-D kernels of length k: it equals the 2-D block on
    ``[B, T, 1, C]`` whose k x k kernels keep only their centre column, without storing the
    other columns. GELU is the exact (erf) one, as torch's ``nn.GELU()``. BatchNorm follows
    Flax (see `DilatedReparamBlock`).

    Attributes:
      kernel_size: depthwise kernel: 0, 3, 5 or a key of `DILATED_REPARAM_BRANCHES` (>= 7).
      spatial_dims: 2 for ``[B, H, W, C]``, 1 for ``[B, T, C]``.
      ffn_factor: hidden width of the FFN / C (4).
      layer_scale_init_value: initial ``gamma``; None or 0 leaves it out (as the official code).
      drop_path: stochastic-depth rate of the residual branch.
      deploy: the re-parameterised inference form.
      bn_momentum, bn_epsilon: of the BatchNorms (Flax semantics).
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initializers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = UniRepLKNetBlock(kernel_size=13)
      >>> x = jax.random.normal(jax.random.key(0), (2, 14, 14, 16))
      >>> variables = block.init(jax.random.key(1), x)
      >>> y = block.apply(variables, x)  # eval: running statistics
      >>> fast = UniRepLKNetBlock(kernel_size=13, deploy=True)
      >>> y2 = fast.apply(reparameterize(variables), x)  # equal up to rounding
    """

    kernel_size: int = 13
    spatial_dims: int = 2
    ffn_factor: float = 4.0
    layer_scale_init_value: float | None = 1e-6
    drop_path: float = 0.0
    deploy: bool = False
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B *S C"],
        *,
        train: bool = False,
        deterministic: bool | None = None,
    ) -> Float[Array, "B *S C"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]`` (``spatial_dims=2``) or ``[B, T, C]`` (``spatial_dims=1``).
          train: normalise with batch statistics and update the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path off; None means ``not train``. With ``drop_path > 0``
            and drop path on, pass an rng named ``"dropout"``.

        Returns:
          The same shape, in ``dtype`` (the input's when None).
        """
        _check_input("UniRepLKNetBlock", x, self.spatial_dims)
        k, d = self.kernel_size, self.spatial_dims
        if k not in (0, 3, 5) and k not in DILATED_REPARAM_BRANCHES:
            raise ValueError(
                f"UniRepLKNetBlock: kernel_size={k!r} is not supported; expected 0 (no conv), "
                f"3 or 5 (plain depthwise) or one of {sorted(DILATED_REPARAM_BRANCHES)} "
                "(DilatedReparamBlock)"
            )
        if deterministic is None:
            deterministic = not train
        dtype = self.dtype or x.dtype
        c = x.shape[-1]
        bn = lambda name: nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        y = x.astype(dtype)
        if k >= 7:
            y = DilatedReparamBlock(
                k, d, deploy=self.deploy, bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon, dtype=dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, name="dwconv",
            )(y, train=train)  # fmt: skip
        elif k > 0:
            y = nn.Conv(
                c, (k,) * d, padding=((k // 2, k // 2),) * d, feature_group_count=c,
                use_bias=self.deploy, dtype=dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, _dw_axes(d)),
                bias_init=self.bias_init, name="dwconv",
            )(y)  # fmt: skip
        if k > 0 and not self.deploy:
            y = bn("norm")(y)
        y = SEBlock(
            dtype=dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, name="se",
        )(y)  # fmt: skip
        dense = lambda f, use_bias, name, axes: nn.Dense(
            f,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=self.bias_init,
            name=name,
        )
        y = dense(int(self.ffn_factor * c), True, "pwconv1", ("channels", "mlp"))(y)
        y = nn.gelu(y, approximate=False)
        y = GRN(use_bias=not self.deploy, param_dtype=self.param_dtype, name="grn")(y)
        y = dense(c, self.deploy, "pwconv2", ("mlp", "channels"))(y)
        if not self.deploy:
            y = bn("pwconv2_bn")(y)
            if self.layer_scale_init_value:
                gamma = self.param(
                    "gamma",
                    nn.with_logical_partitioning(
                        nn.initializers.constant(self.layer_scale_init_value), ("channels",)
                    ),
                    (c,),
                    self.param_dtype,
                )
                y = y * gamma.astype(y.dtype).reshape((1,) * (d + 1) + (c,))
        y = drop_path(self, y, self.drop_path, deterministic)
        return x.astype(y.dtype) + y
