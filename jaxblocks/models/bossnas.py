"""BossNet and the HyTra supernet: the hybrid CNN-transformer search space of BossNAS.

Li et al., "BossNAS: Exploring Hybrid CNN-transformers with Block-wisely Self-supervised Neural
Architecture Search", https://arxiv.org/abs/2103.12424. Official code: changlin31/BossNAS
``retraining_hytra/boss_models.py`` (``BossNet``, ``bossnet_T0``) and
``searching/bossnas/models/supernets/hytra_supernet.py`` (the fabric-like supernet).

A path of the HyTra space is an *encoding*: one tuple per stage (4 stages at strides 4, 8, 16,
32 after the stem), each entry a block choice, ``1`` = `ResConv`, ``0`` = `ResAtt` (the official
convention). The lengths of the tuples place the down-sampling positions; a stage with no block
is a strided 3x3 conv-BN-act. BossNet-T0 is ``((1,), (1,), (1, 1, 1, 0, 1), (0, 0, 0, 1, 0, 0,
0, 0, 0))``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.bossnas import (
    ACTIVATION_AXES,
    BN_EPSILON,
    BN_MOMENTUM,
    CONV_AXES,
    ResAtt,
    ResConv,
    default_kernel_init,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "BOSSNAS_PARAMS",
    "BOSSNAS_PRESETS",
    "BOSSNET_T0_ENCODING",
    "BossNet",
    "BossNetConfig",
    "HyTraSupernet",
    "HyTraSupernetConfig",
    "default_path",
    "extract_path",
    "validate_path",
]

Dtype = Any
Encoding = tuple[tuple[int, ...], ...]

BOSSNET_T0_ENCODING: Encoding = ((1,), (1,), (1, 1, 1, 0, 1), (0, 0, 0, 1, 0, 0, 0, 0, 0))
_ACTS = {"silu": nn.silu, "relu": nn.relu}


def validate_path(path: Any, num_layers: int | None = None, *, where: str = "BossNet") -> Encoding:
    """``path`` as a tuple of 4 tuples of 0/1 (ValueError naming ``path`` otherwise); with
    ``num_layers``, the total number of blocks must equal it (the supernet's layers)."""
    ok = isinstance(path, (tuple, list)) and len(path) == 4
    ok = ok and all(isinstance(s, (tuple, list)) for s in path)
    ok = ok and all(c in (0, 1) and not isinstance(c, bool) for s in path for c in s)
    if not ok:
        raise ValueError(
            f"{where}: path must be 4 tuples (one per stage) of choices 1 (ResConv) or 0 "
            f"(ResAtt), got {path!r}"
        )
    path = tuple(tuple(int(c) for c in s) for s in path)
    if num_layers is not None and sum(map(len, path)) != num_layers:
        raise ValueError(
            f"{where}: path {path!r} has {sum(map(len, path))} blocks; the supernet has "
            f"num_layers={num_layers}"
        )
    return path


def default_path(num_layers: int) -> Encoding:
    """All-ResConv path with the layers spread evenly over the 4 stages (earlier ones first)."""
    return tuple((1,) * (num_layers // 4 + (i < num_layers % 4)) for i in range(4))


@dataclasses.dataclass(frozen=True)
class BossNetConfig:
    """Architecture of a `BossNet` (https://arxiv.org/abs/2103.12424); defaults: BossNet-T0.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features.
      encoding: the searched path (see the module docstring).
      channels: bottleneck width of each stage; blocks output ``4x`` this.
      stem_width: channels of the 7x7 stem conv.
      heads: ResAtt heads per stage.
      dim_head: ResAtt channels per head.
      act: ``"silu"`` (T0) or ``"relu"`` (T0 w/o SE).
      se: SE in the ResConv blocks.
      avg_down: ResNet-D shortcuts.
      drop_rate: dropout before the classifier.
      drop_path_rate: stochastic depth of the ResConv blocks, ``rate * j / 15`` for global block
        index ``j`` as the official code (0 in the presets).
    """

    num_classes: int = 1000
    encoding: Encoding = BOSSNET_T0_ENCODING
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    heads: tuple[int, ...] = (1, 2, 4, 8)
    dim_head: int = 64
    act: str = "silu"
    se: bool = True
    avg_down: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self, "BossNet")
        validate_path(self.encoding, where="BossNet")


@dataclasses.dataclass(frozen=True)
class HyTraSupernetConfig:
    """Architecture of a `HyTraSupernet`; fields as `BossNetConfig`, with ``num_layers`` (the
    fabric's length, 16 as the official ``net_num_blocks``) instead of ``encoding``."""

    num_classes: int = 1000
    num_layers: int = 16
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    heads: tuple[int, ...] = (1, 2, 4, 8)
    dim_head: int = 64
    act: str = "silu"
    se: bool = True
    avg_down: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self, "HyTraSupernet")


def _validate(cfg: Any, where: str) -> None:
    if len(cfg.channels) != 4 or len(cfg.heads) != 4:
        raise ValueError(
            f"{where}: channels and heads need 4 entries, got {cfg.channels!r}, {cfg.heads!r}"
        )
    if any(c < 16 or c % 4 for c in cfg.channels):
        raise ValueError(
            f"{where}: channels must be multiples of 4 and >= 16 (SE reduces 4c by "
            f"16), got {cfg.channels!r}"
        )
    if cfg.act not in _ACTS:
        raise ValueError(f"{where}: act must be one of {sorted(_ACTS)}, got {cfg.act!r}")
    if cfg.num_classes < 0:
        raise ValueError(f"{where}: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"{where}: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")
    if getattr(cfg, "num_layers", 1) < 1:
        raise ValueError(f"{where}: num_layers must be >= 1, got {cfg.num_layers}")


def _block_plan(path: Encoding, channels) -> list[tuple[int, int, bool, int]]:
    """``(global index j, stage s, first in stage, choice)`` of every block of ``path``."""
    plan, j = [], 0
    for s, stage in enumerate(path):
        for k, choice in enumerate(stage):
            plan.append((j, s, k == 0, choice))
            j += 1
    return plan


class _StageConv(nn.Module):
    """A stage without blocks: strided 3x3 conv -> BN -> act (official ``make_boss_blocks``)."""

    features: int
    act: Any
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = nn.Conv(
            self.features,
            (3, 3),
            (2, 2),
            ((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return self.act(x)


class _Net(nn.Module):
    """Stem, stages and head shared by `BossNet` and `HyTraSupernet` (the subclasses say which
    blocks exist and what they are named)."""

    def _kw(self, x):
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        return dtype

    def _block(self, s: int, first: bool, choice: int, j: int, dtype, name: str) -> nn.Module:
        act = _ACTS[self.act]
        stride = 2 if first and s > 0 else 1
        if choice == 1:
            rate = self.drop_path_rate * j / 15  # the official net_num_blocks - 1
            return ResConv(
                self.channels[s],
                stride,
                self.se,
                self.avg_down,
                act,
                rate,
                dtype,
                self.param_dtype,
                name=name,
            )
        return ResAtt(
            4 * self.channels[s],
            self.heads[s],
            self.dim_head,
            stride,
            self.avg_down,
            act,
            dtype,
            self.param_dtype,
            name=name,
        )

    def _empty_stages(self, dtype) -> list[nn.Module]:
        return [
            _StageConv(4 * c, _ACTS[self.act], dtype, self.param_dtype, name=f"stage{s}")
            for s, c in enumerate(self.channels)
        ]

    def _bn(self, train, dtype, name):
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _stem(self, x, train, dtype):
        x = nn.Conv(
            self.stem_width,
            (7, 7),
            (2, 2),
            ((3, 3), (3, 3)),
            use_bias=False,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="conv1",
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
        )(x)
        x = _ACTS[self.act](self._bn(train, dtype, "bn1")(x))
        return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    def _head(self, x, train, dtype):
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="fc",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "classes")
            ),
        )(x)

    def _forward(self, x, path, blocks, empty, train, features):
        """``blocks[(j, s, first, choice)]`` -> module; runs stem, stages, head."""
        if x.ndim != 4:
            raise ValueError(
                f"{type(self).__name__}: x must be NHWC [B, H, W, C], got shape {x.shape}"
            )
        dtype = self._kw(x)
        if dtype is not None:
            x = x.astype(dtype)
        x = self._stem(x, train, dtype)
        plan = _block_plan(path, self.channels)
        outputs = []
        for s, stage in enumerate(path):
            if not stage:
                x = empty[s](x, train=train)
            for key in (p for p in plan if p[1] == s):
                x = blocks[key](x, train=train, deterministic=not train)
                x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)
        if features:
            return tuple(outputs)
        return self._head(x, train, dtype)


class BossNet(_Net):
    """BossNet: a searched hybrid CNN-transformer (Li et al., https://arxiv.org/abs/2103.12424).

    A ResNet-50-shaped network (7x7 stem, max pool, 4 stages of width ``4 * channels``) whose 16
    blocks are each a `ResConv` bottleneck or a `ResAtt` self-attention block, with the
    down-sampling positions also searched (``encoding``); convolutions early, attention late.
    Unlike BoTNet the attention blocks have no relative positions (a depthwise PEG instead) and
    can down-sample; unlike ViT hybrids the stage lengths are free. Same layout and parameter
    count as the official ``BossNet`` (``bossnet_T0``): 38,415,960 parameters at 1000 classes.

    Train or eval as the other BatchNorm models: ``train=None`` (default) trains when
    ``batch_stats`` is mutable or while initialising, and otherwise raises a ValueError; drop
    path and dropout need an rng named ``"dropout"`` in training. ``features=True`` returns the
    four stage outputs ``[B, H/4s, W/4s, 4 * channels[s]]`` instead of the logits.

    Deviations: channels-last; BatchNorm follows Flax (momentum 0.9 = torch's 0.1, biased
    running variance); the official code's ``output_stride``/``last_stride`` options
    (BossNet-T1) and deep-stem option (unused by T0) are not offered.

    Attributes:
      num_classes, encoding, channels, stem_width, heads, dim_head, act, se, avg_down,
        drop_rate, drop_path_rate: see `BossNetConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = BossNet(num_classes=10, encoding=((1,), (0,), (), (0,)),
      ...                 channels=(16, 16, 16, 32), stem_width=16, heads=(1, 1, 2, 2),
      ...                 dim_head=8)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    encoding: Encoding = BOSSNET_T0_ENCODING
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    heads: tuple[int, ...] = (1, 2, 4, 8)
    dim_head: int = 64
    act: str = "silu"
    se: bool = True
    avg_down: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``; the stage
        outputs if ``features``)."""
        _validate(self, "BossNet")
        path = validate_path(self.encoding, where="BossNet")
        train = resolve_train(self, train)
        dtype = self._kw(x)
        blocks = {
            key: self._block(key[1], key[2], key[3], key[0], dtype, f"blocks_{key[0]}")
            for key in _block_plan(path, self.channels)
        }
        empty = {s: m for s, m in enumerate(self._empty_stages(dtype)) if not path[s]}
        return self._forward(x, path, blocks, empty, train, features)


def _candidate_name(j: int, s: int, first: bool, choice: int) -> str:
    return f"layer{j}_stage{s}_{'down' if first else 'same'}_{'conv' if choice else 'att'}"


class HyTraSupernet(_Net):
    """The HyTra supernet of BossNAS (https://arxiv.org/abs/2103.12424): every candidate of a
    fabric of ``num_layers`` layers, any sampled path of which is a `BossNet`.

    Layer ``j`` holds, for every stage ``s`` it may sit in, a `ResConv` and a `ResAtt` that
    keep the resolution (``same``; not for layer 0) and a pair that enters the stage
    (``down``: stride 2, from the previous stage's width), so the down-sampling positions are
    searched with the operations; each stage also holds the strided 3x3 conv used when it gets
    no layer. ``init`` creates every candidate (the official supernet's full weight set);
    ``apply`` runs one path, a static encoding as `BossNet`'s (`validate_path`), given as the
    ``path`` call argument or attribute (default: `default_path`). The sub-tree
    ``extract_path(variables, path)`` are the variables of ``BossNet(encoding=path)``, which
    then gives the same outputs.

    Deviation from the official searching code: its candidates share the 3x3/1x1 convs between
    the ``same`` and ``down`` variants and restrict the scales of each block (``stage_depths``),
    and it is trained block-wise (the Siamese ensemble bootstrapping, not part of this module);
    here the variants are separate modules of the retraining form, so that a path is exactly the
    stand-alone `BossNet`.

    Attributes:
      num_classes, num_layers, channels, stem_width, heads, dim_head, act, se, avg_down,
        drop_rate, drop_path_rate: see `HyTraSupernetConfig`.
      path: the default path of ``apply`` (None: `default_path`).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> net = HyTraSupernet(num_classes=10, num_layers=2, channels=(16, 16, 16, 16),
      ...                     stem_width=16, heads=(1, 1, 1, 1), dim_head=8)
      >>> x = jnp.ones((1, 32, 32, 3))
      >>> variables = net.init(jax.random.key(0), x)
      >>> net.apply(variables, x, train=False, path=((0,), (), (1,), ())).shape
      (1, 10)
    """

    num_classes: int = 1000
    num_layers: int = 16
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    heads: tuple[int, ...] = (1, 2, 4, 8)
    dim_head: int = 64
    act: str = "silu"
    se: bool = True
    avg_down: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    path: Encoding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    from_config = classmethod(config_fields_module)

    def candidates(self) -> list[tuple[int, int, bool, int]]:
        """``(layer j, stage s, first, choice)`` of every candidate."""
        return [
            (j, s, first, c)
            for j in range(self.num_layers)
            for s in range(4)
            for first in ((True,) if j == 0 else (True, False))
            for c in (1, 0)
        ]

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W 3"],
        *,
        path: Encoding | None = None,
        train: bool | None = None,
        features: bool = False,
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits of the sampled ``path`` (call argument, else the attribute, else
        `default_path`)."""
        _validate(self, "HyTraSupernet")
        path = path if path is not None else self.path
        path = default_path(self.num_layers) if path is None else path
        path = validate_path(path, self.num_layers, where="HyTraSupernet")
        train = resolve_train(self, train)
        dtype = self._kw(x)
        blocks = {
            key: self._block(key[1], key[2], key[3], key[0], dtype, _candidate_name(*key))
            for key in self.candidates()
        }
        empty = self._empty_stages(dtype)
        if self.is_initializing():
            self._init_all(x, blocks, empty, dtype)
        return self._forward(x, path, blocks, empty, train, features)

    def _init_all(self, x, blocks, empty, dtype):
        """Run every candidate (and empty-stage conv) once on a dummy of its input's shape so
        that ``init`` creates the whole supernet."""
        h, w = math.ceil(math.ceil(x.shape[1] / 2) / 2), math.ceil(math.ceil(x.shape[2] / 2) / 2)
        dt = dtype or x.dtype
        in_chs = [self.stem_width] + [4 * c for c in self.channels]
        sizes = [(h, w)]
        for _ in range(4):
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        for s in range(4):
            prev = sizes[s - 1] if s > 0 else sizes[0]
            dummy = jnp.zeros((x.shape[0], *prev, in_chs[s]), dt)
            empty[s](dummy, train=False)
        for j, s, first, c in self.candidates():
            size, chs = (sizes[max(s - 1, 0)], in_chs[s]) if first else (sizes[s], in_chs[s + 1])
            blocks[(j, s, first, c)](jnp.zeros((x.shape[0], *size, chs), dt), train=False)


def extract_path(variables: dict[str, Any], path: Encoding) -> dict[str, Any]:
    """The variables of ``BossNet(encoding=path)`` taken from `HyTraSupernet` ``variables``
    (the stand-alone network inheriting the supernet's weights)."""
    path = validate_path(path, where="extract_path")
    out: dict[str, Any] = {}
    for col, tree in variables.items():
        new = {k: v for k, v in tree.items() if not k.startswith("layer")}
        new = {k: v for k, v in new.items() if not k.startswith("stage") or not path[int(k[5])]}
        for j, s, first, c in _block_plan(path, None):
            name = _candidate_name(j, s, first, c)
            if name in tree:
                new[f"blocks_{j}"] = tree[name]
            elif col == "params":
                raise ValueError(f"extract_path: the supernet has no candidate {name!r}")
        out[col] = new
    return out


BOSSNAS_PRESETS: dict[str, Any] = {
    "bossnet_t0": BossNetConfig(),
    "bossnet_t0_nose": BossNetConfig(act="relu", se=False),
    "hytra_supernet": HyTraSupernetConfig(),
}

# sum(p.numel() for p in boss_models.bossnet_T0().parameters()) of the official code (rebuilt in
# tests/models/test_bossnas.py with timm 1.0.31's SEModule); the paper's Table reports 38.4M.
BOSSNAS_PARAMS: dict[str, int | None] = {
    "bossnet_t0": 38_415_960,
    "bossnet_t0_nose": None,
    "hytra_supernet": None,
}


def _example_image(config: Any) -> Array:
    n = 2 * 32 * 32 * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, 32, 32, 3)


_PAPER = Paper(
    "BossNAS: Exploring Hybrid CNN-transformers with Block-wisely Self-supervised Neural "
    "Architecture Search",
    arxiv="2103.12424",
    code="https://github.com/changlin31/BossNAS",
)
_TINY = {
    "channels": (16, 16, 16, 32),
    "stem_width": 16,
    "heads": (1, 1, 2, 2),
    "dim_head": 8,
    "num_classes": 10,
}

register_presets(
    BossNet.from_config,
    {k: BOSSNAS_PRESETS[k] for k in ("bossnet_t0",)},
    example_input=_example_image,
    doc="The official {name} (BossNAS, arXiv 2103.12424); kwargs override config fields.",
    paper=_PAPER,
    published_params={"bossnet_t0": BOSSNAS_PARAMS["bossnet_t0"]},
    params_source="sum of numel() of the official retraining_hytra/boss_models.bossnet_T0() "
    "(rebuilt in tests/models/test_bossnas.py); the paper reports 38.4M",
    tiny={**_TINY, "encoding": ((1,), (0,), (1, 0), (0,))},
)
register_presets(
    BossNet.from_config,
    {k: BOSSNAS_PRESETS[k] for k in ("bossnet_t0_nose",)},
    example_input=_example_image,
    doc="The official {name} (BossNet-T0 w/o SE, ReLU; arXiv 2103.12424).",
    paper=_PAPER,
    published_params={"bossnet_t0_nose": None},
    params_source="no published count: the paper and README give MAdds and accuracy only for T0 "
    "w/o SE",
    tiny={**_TINY, "encoding": ((1,), (0,), (1, 0), (0,))},
)
register_presets(
    HyTraSupernet.from_config,
    {k: BOSSNAS_PRESETS[k] for k in ("hytra_supernet",)},
    example_input=_example_image,
    doc="The HyTra supernet of BossNAS (arXiv 2103.12424) with 16 layers; kwargs override "
    "config fields, ``path`` picks the default path.",
    paper=_PAPER,
    published_params={"hytra_supernet": None},
    params_source="no published count (our supernet keeps separate same/down candidates, see "
    "HyTraSupernet)",
    tiny={**_TINY, "num_layers": 2},
)
