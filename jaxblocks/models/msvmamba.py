"""MSVMamba — Shi, Dong, Xu, "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space
Model", NeurIPS 2024, https://arxiv.org/abs/2405.14174. Official code: YuHengsss/MSVMamba
``classification/models/vmamba.py`` (class ``VSSM``), configs
``classification/configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml``.

The VMamba hierarchy (patch embed 4×4 → four stages of VSS blocks with patch merging between
them → LayerNorm → average pool → Linear) built from `jaxblocks.blocks.msvmamba.MSVMambaBlock`:
multi-scale 2-D selective scans (one full-resolution scan + one scan over three half-resolution
directions) and a ConvFFN. `convert_official` maps an official checkpoint's ``state_dict`` onto
this model's variables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.blocks.msvmamba import LINEAR_INIT, MSVMambaBlock, torch_default_init
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "MSVMAMBA_PARAMS",
    "MSVMAMBA_PRESETS",
    "MSVMamba",
    "MSVMambaConfig",
    "PatchMerging2D",
    "convert_official",
]

Dtype = Any
LN_EPS = 1e-5  # torch nn.LayerNorm, which the configs' NORM_LAYER "ln" selects
ACTIVATION_AXES = ("batch", "height", "width", "channels")


@dataclasses.dataclass(frozen=True)
class MSVMambaConfig:
    """Architecture of an `MSVMamba` (https://arxiv.org/abs/2405.14174); default: Nano.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled, normalised features.
      depths: VSS blocks per stage (4 stages).
      dims: channels per stage (the official ``EMBED_DIM · 2^i``).
      patch_size: stride of the patch embedding (4).
      in_chans: image channels (3).
      d_state, ssm_ratio, dt_rank, d_conv, se_reduction: the scans (see `MultiScaleSS2D`).
      ms_stages: stages whose blocks use the multi-scale scan (official ``MS_STAGE``, all
        four); the others use VMamba's four-direction SS2D.
      ffn_expansion, ffn_dropout: the ConvFFN (``FFN_DROPOUT`` is 0 in the released configs).
      drop_path_rate: stochastic depth, ``linspace(0, rate)`` over all blocks (0.2 official).
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (1, 2, 5, 2)
    dims: tuple[int, ...] = (48, 96, 192, 384)
    patch_size: int = 4
    in_chans: int = 3
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    se_reduction: int | None = 8
    ms_stages: tuple[int, ...] = (0, 1, 2, 3)
    ffn_expansion: int = 2
    ffn_dropout: float = 0.0
    drop_path_rate: float = 0.2

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    if len(cfg.depths) != len(cfg.dims) or not cfg.depths:
        raise ValueError(
            f"MSVMamba: depths {tuple(cfg.depths)} and dims {tuple(cfg.dims)} must be non-empty "
            "and of the same length (one entry per stage)"
        )
    if any(int(d) < 1 for d in cfg.depths) or any(int(c) < 1 for c in cfg.dims):
        raise ValueError(
            f"MSVMamba: depths and dims must be ints >= 1, got {cfg.depths!r}, {cfg.dims!r}"
        )
    if cfg.num_classes < 0:
        raise ValueError(f"MSVMamba: num_classes must be >= 0, got {cfg.num_classes}")
    if cfg.patch_size < 1:
        raise ValueError(f"MSVMamba: patch_size must be >= 1, got {cfg.patch_size}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"MSVMamba: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


class PatchMerging2D(nn.Module):
    """VMamba's patch merging (``downsample_version="v1"``): 2×2 neighbours → LN(4C) → Linear.

    Odd H or W are zero-padded at the bottom/right first; the four neighbours are concatenated
    in the official order ``(0,0), (1,0), (0,1), (1,1)`` (row offset, column offset). The
    Linear ``reduction`` has no bias.
    """

    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H/2 W/2 C2"]:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = jnp.pad(x, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )  # [B, H/2, W/2, 4C]
        x = nn.LayerNorm(LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return nn.Dense(
            self.out_dim,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(LINEAR_INIT, ("embed", "mlp")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="reduction",
        )(x)


class MSVMamba(nn.Module):
    """Multi-Scale VMamba classifier (Shi et al., https://arxiv.org/abs/2405.14174).

    VMamba's four-stage hierarchy (strides 4, 8, 16, 32) whose SS2D scans three of its four
    directions on a half-resolution map (`MultiScaleSS2D`) and whose MLP is a ConvFFN, with SE
    in the mixer. Patch embedding: conv ``p×p`` stride ``p`` (bias) → LayerNorm. Each stage runs
    its `MSVMambaBlock` s, then (except the last) `PatchMerging2D` to ``dims[i+1]``. Head:
    LayerNorm → global average pool → Linear. Parameter names follow the official ones
    (``layers_1_blocks_0/op/x_proj_weight``, ``layers_0_downsample/reduction``, ``norm``,
    ``head``); `convert_official` maps a state dict by name.

    Stage features: ``features=True`` returns the tuple of the four stage outputs
    ``[B, H/4, W/4, C1]`` ... ``[B, H/32, W/32, C4]`` (after each stage's blocks, before its
    patch merging and before the final LayerNorm: the official ``Backbone_VSSM`` outputs without
    its detection-only ``outnorm`` layers). ``num_classes=0`` returns the pooled features.

    Deviations: channels-last; any input of at least ``patch_size`` pixels (odd sizes are
    padded by the patch merging as the official code does); drop path and ConvFFN dropout need
    an rng named ``"dropout"`` when ``train=True``.

    Attributes:
      num_classes, depths, dims, patch_size, in_chans, d_state, ssm_ratio, dt_rank, d_conv,
        se_reduction, ms_stages, ffn_expansion, ffn_dropout, drop_path_rate: see
        `MSVMambaConfig`.
      implementation: the selective-scan kernel (None: automatic).
      dtype: compute dtype. param_dtype: parameter storage dtype.

    Example:
      >>> model = MSVMamba(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x).shape
      (2, 10)
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (1, 2, 5, 2)
    dims: tuple[int, ...] = (48, 96, 192, 384)
    patch_size: int = 4
    in_chans: int = 3
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    se_reduction: int | None = 8
    ms_stages: tuple[int, ...] = (0, 1, 2, 3)
    ffn_expansion: int = 2
    ffn_dropout: float = 0.0
    drop_path_rate: float = 0.2
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]``, or the stage outputs with ``features=True``.

        Args:
          x: NHWC images ``[B, H, W, in_chans]``, H and W at least ``patch_size``.
          train: drop path / dropout on (needs the ``"dropout"`` rng).
          features: return the four stage outputs instead of the logits.
        """
        _validate(self)
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(
                f"MSVMamba: x must be NHWC [B, H, W, {self.in_chans}], got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
        if x.shape[-1] != self.in_chans:
            raise ValueError(
                f"MSVMamba: x of shape {x.shape} must have in_chans={self.in_chans} channels last"
            )
        if min(x.shape[1:3]) < self.patch_size or x.shape[0] < 1:
            raise ValueError(
                f"MSVMamba: x of shape {x.shape} is too small; H and W must be at least "
                f"patch_size={self.patch_size} and B >= 1"
            )
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"MSVMamba: x must be a real image array, got dtype {x.dtype}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        k_init, b_init = torch_default_init(self.in_chans * p * p)
        x = nn.Conv(
            self.dims[0], (p, p), strides=p, padding="VALID", kernel_init=k_init,
            bias_init=b_init, name="patch_embed", **kw,
        )(x.astype(self.dtype))  # fmt: skip
        x = nn.LayerNorm(LN_EPS, name="patch_norm", **kw)(x)
        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, depth in enumerate(self.depths):
            for j in range(depth):
                x = MSVMambaBlock(
                    d_state=self.d_state,
                    ssm_ratio=self.ssm_ratio,
                    dt_rank=self.dt_rank,
                    d_conv=self.d_conv,
                    se_reduction=self.se_reduction,
                    multiscale=i in self.ms_stages,
                    ffn_expansion=self.ffn_expansion,
                    ffn_dropout=self.ffn_dropout,
                    drop_path=rates[i][j],
                    implementation=self.implementation,
                    name=f"layers_{i}_blocks_{j}",
                    **kw,
                )(x, train=train)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)
            if i < len(self.depths) - 1:
                x = PatchMerging2D(self.dims[i + 1], name=f"layers_{i}_downsample", **kw)(x)
        if features:
            return tuple(outputs)
        x = nn.LayerNorm(LN_EPS, name="norm", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(LINEAR_INIT, ("embed", "classes")),
            name="head",
            **kw,
        )(x)


MSVMAMBA_PRESETS: dict[str, MSVMambaConfig] = {
    "msvmamba_nano": MSVMambaConfig(depths=(1, 2, 5, 2), dims=(48, 96, 192, 384)),
    "msvmamba_micro": MSVMambaConfig(depths=(1, 2, 5, 2), dims=(64, 128, 256, 512)),
    "msvmamba_tiny": MSVMambaConfig(depths=(1, 2, 9, 2), dims=(96, 192, 384, 768)),
}

# sum(p.numel() for p in VSSM(...).parameters()) of the official vmamba.py built with the
# ms_vssm configs (num_classes=1000). The configs' comments give 6.86M / 11.88M / 33.08M; the
# README 7M / 12M / 33M. (Tiny's constructor count is 33.05M: the comment is 0.1% off.)
MSVMAMBA_PARAMS: dict[str, int] = {
    "msvmamba_nano": 6_864_136,
    "msvmamba_micro": 11_879_272,
    "msvmamba_tiny": 33_046_312,
}


def _example_image(config: MSVMambaConfig) -> Array:
    size = 8 * config.patch_size  # four tokens per side at stage 1, one at stage 4
    n = 2 * size * size * config.in_chans
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, config.in_chans)


register_presets(
    MSVMamba.from_config,
    MSVMAMBA_PRESETS,
    example_input=_example_image,
    doc="{name}: the official {name} (Multi-Scale VMamba, arXiv 2405.14174, "
    "vssm_*_224_ms.yaml); kwargs override config fields.",
    paper=Paper(
        "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model",
        arxiv="2405.14174",
        code="https://github.com/YuHengsss/MSVMamba",
    ),
    published_params=MSVMAMBA_PARAMS,
    params_source=(
        "sum of numel() over the parameters of the official YuHengsss/MSVMamba VSSM "
        "(classification/models/vmamba.py) built with configs/ms_vssm/vssm_{nano,micro,tiny}"
        "_224_ms.yaml, num_classes=1000, counted with torch; the config comments give 6.86M / "
        "11.88M / 33.08M and the README 7M / 12M / 33M"
    ),
    tiny={"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32), "num_classes": 10},
)


# --- official checkpoint -> Flax variables -------------------------------------------------------


def _linear(w):
    return w.T  # torch [out, in] -> Flax [in, out]


def _conv(w):
    return np.transpose(w, (2, 3, 1, 0))  # torch [O, I/g, kh, kw] -> Flax [kh, kw, I/g, O]


def _conv1x1(w):
    return w[:, :, 0, 0].T  # 1×1 Conv2d [O, I, 1, 1] -> Dense [I, O]


def _same(w):
    return w


_LN = {"weight": ("scale", _same), "bias": ("bias", _same)}
_LINEAR = {"weight": ("kernel", _linear), "bias": ("bias", _same)}
_CONV = {"weight": ("kernel", _conv), "bias": ("bias", _same)}
_CONV1X1 = {"weight": ("kernel", _conv1x1), "bias": ("bias", _same)}

# official module path (after the layer/block prefix) -> (Flax path, leaf table)
_BLOCK_MODULES: dict[str, tuple[tuple[str, ...], dict]] = {
    "norm": (("norm",), _LN),
    "norm2": (("norm2",), _LN),
    "op.in_proj": (("op", "in_proj"), _LINEAR),
    "op.out_proj": (("op", "out_proj"), _LINEAR),
    "op.conv2d": (("op", "conv2d"), _CONV),
    "op.conv2d_b1": (("op", "conv2d_b1"), _CONV),
    "op.out_norm": (("op", "out_norm"), _LN),
    "op.se.fc.0": (("op", "se", "fc1"), _LINEAR),
    "op.se.fc.2": (("op", "se", "fc2"), _LINEAR),
    "convFFN.linear1": (("ffn", "linear1"), _CONV1X1),
    "convFFN.linear2": (("ffn", "linear2"), _CONV1X1),
    "convFFN.dwc": (("ffn", "dwc"), _CONV),
}
_SCAN_PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
_TOP_MODULES: dict[str, tuple[tuple[str, ...], dict]] = {
    "patch_embed.0": (("patch_embed",), _CONV),
    "patch_embed.2": (("patch_norm",), _LN),
    "classifier.norm": (("norm",), _LN),
    "classifier.head": (("head",), _LINEAR),
}


def _flax_path(key: str) -> tuple[tuple[str, ...], Any]:
    """The Flax path of an official state-dict key and the array transform; KeyError if none."""
    module, _, leaf = key.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if m:
        prefix = (f"layers_{m[1]}_blocks_{m[2]}",)
        rest = m[3]
        if rest.startswith("op.") and rest[3:] in _SCAN_PARAMS:
            return prefix + ("op", rest[3:]), _same
        module, _, leaf = rest.rpartition(".")
        if module in _BLOCK_MODULES and leaf in _BLOCK_MODULES[module][1]:
            path, table = _BLOCK_MODULES[module]
            name, fn = table[leaf]
            return prefix + path + (name,), fn
        raise KeyError(key)
    m = re.fullmatch(r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", key)
    if m:
        table = _LN if m[2] == "norm" else _LINEAR
        name, fn = table[m[3]]
        return (f"layers_{m[1]}_downsample", m[2], name), fn
    if module in _TOP_MODULES and leaf in _TOP_MODULES[module][1]:
        path, table = _TOP_MODULES[module]
        name, fn = table[leaf]
        return path + (name,), fn
    raise KeyError(key)


def _infer_config(state_dict: Mapping[str, Any]) -> MSVMambaConfig:
    """Depths, dims, patch size, channels, classes and d_state read off the official keys."""
    try:
        embed = np.shape(state_dict["patch_embed.0.weight"])  # [C0, in, p, p]
        depths: dict[int, int] = {}
        for k in state_dict:
            m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
            if m:
                depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
        n_stages = max(depths) + 1
        dims = tuple(
            int(np.shape(state_dict[f"layers.{i}.blocks.0.norm.weight"])[0])
            for i in range(n_stages)
        )
        d_state = int(np.shape(state_dict["layers.0.blocks.0.op.A_logs"])[1])
        head = state_dict.get("classifier.head.weight")
        num_classes = 0 if head is None else int(np.shape(head)[0])
    except KeyError as e:
        raise ValueError(
            f"convert_official: cannot infer the architecture, key {e.args[0]!r} is missing; "
            "pass model= explicitly"
        ) from None
    return MSVMambaConfig(
        num_classes=num_classes,
        depths=tuple(depths.get(i, 0) for i in range(n_stages)),
        dims=dims,
        patch_size=int(embed[2]),
        in_chans=int(embed[1]),
        d_state=d_state,
    )


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def convert_official(
    state_dict: Mapping[str, Any], model: MSVMamba | None = None
) -> dict[str, Any]:
    """Flax variables of `MSVMamba` from an official MSVMamba ``state_dict`` (arXiv 2405.14174).

    Names map as the official ``VSSM`` → this model (``layers.2.blocks.1.op.x_proj_weight`` →
    ``layers_2_blocks_1/op/x_proj_weight``, ``convFFN.linear1`` → ``ffn/linear1``,
    ``op.se.fc.0`` → ``op/se/fc1``, ``patch_embed.0``/``.2`` → ``patch_embed``/``patch_norm``,
    ``classifier.norm``/``.head`` → ``norm``/``head``); Linear weights are transposed, Conv2d
    weights go ``[O, I, kh, kw] → [kh, kw, I, O]``, the ConvFFN's 1×1 convs become Dense
    kernels, the scan parameters keep their layout. Values may be torch tensors or arrays.

    Args:
      state_dict: the official model's ``state_dict()`` (the ``"model"`` entry of a released
        checkpoint). Every key must map and every parameter of the model must be given.
      model: the `MSVMamba` to fill (its shapes are checked); None infers depths, dims,
        patch size, channels, classes and d_state from the keys (other fields default).

    Returns:
      ``{"params": ...}`` for ``model.apply``.

    Raises:
      ValueError: naming the key, for an unknown key, a missing parameter or a shape mismatch.

    Example:
      >>> variables = convert_official(torch.load(path)["model"])  # doctest: +SKIP
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"convert_official: state_dict must be a mapping of official key -> tensor, got "
            f"{type(state_dict).__name__}"
        )
    if model is None:
        model = MSVMamba.from_config(_infer_config(state_dict))
    size = 8 * model.patch_size
    x = jax.ShapeDtypeStruct((1, size, size, model.in_chans), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    expected = {
        tuple(getattr(k, "key", k) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    params: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    for key, value in state_dict.items():
        try:
            path, fn = _flax_path(key)
        except KeyError:
            raise ValueError(f"convert_official: unknown official key {key!r}") from None
        if path not in expected:
            raise ValueError(
                f"convert_official: key {key!r} (-> {'/'.join(path)}) is not a parameter of this "
                f"model (depths={model.depths}, dims={model.dims})"
            )
        array = fn(_to_numpy(value))
        if array.shape != tuple(expected[path]):
            raise ValueError(
                f"convert_official: key {key!r} has shape {tuple(np.shape(value))}, giving "
                f"{array.shape} for {'/'.join(path)}; the model expects {tuple(expected[path])}"
            )
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(array, model.param_dtype)
        seen[path] = key
    missing = sorted("/".join(p) for p in expected if p not in seen)
    if missing:
        raise ValueError(
            f"convert_official: {len(missing)} parameter(s) missing from state_dict, the first "
            f"official key {_official_key(missing[0])!r} (-> {missing[0]})"
        )
    return {"params": params}


def _official_key(flax_path: str) -> str:
    """The official key for a Flax path (for error messages)."""
    parts = tuple(flax_path.split("/"))
    inverse: dict[tuple[str, ...], str] = {}
    for module, (path, table) in _TOP_MODULES.items():
        for leaf, (name, _) in table.items():
            inverse[path + (name,)] = f"{module}.{leaf}"
    if parts in inverse:
        return inverse[parts]
    m = re.fullmatch(r"layers_(\d+)_blocks_(\d+)", parts[0])
    if m:
        prefix = f"layers.{m[1]}.blocks.{m[2]}."
        if parts[1] == "op" and len(parts) == 3 and parts[2] in _SCAN_PARAMS:
            return prefix + "op." + parts[2]
        for module, (path, table) in _BLOCK_MODULES.items():
            for leaf, (name, _) in table.items():
                if parts[1:] == path + (name,):
                    return prefix + f"{module}.{leaf}"
    m = re.fullmatch(r"layers_(\d+)_downsample", parts[0])
    if m:
        leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}[parts[-1]]
        return f"layers.{m[1]}.downsample.{parts[1]}.{leaf}"
    return flax_path
