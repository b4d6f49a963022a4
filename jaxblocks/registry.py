"""Model registry: `register_model`, `register_presets`, `create_model`, `list_models`,
`model_info`, `example_input`.

Models register a factory under a name; `create_model(name, **overrides)` builds the Linen
module. A model file with a frozen config dataclass declares its presets (registry name ->
config) and calls `register_presets` once; a single model uses `register_model`. The trainer and
the registry tests reach models only through here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}
_EXAMPLES: dict[str, Callable[..., Any]] = {}
# Modules whose import registers models; imported lazily so `import jaxblocks` stays light.
# (SparK's pretrainer wraps any registered CNN, so it lives in `analysis` and registers there.)
_MODEL_MODULES: tuple[str, ...] = ("jaxblocks.models", "jaxblocks.analysis.spark")


@dataclasses.dataclass(frozen=True)
class Paper:
    """The paper a model comes from.

    Attributes:
      title: the paper's title.
      arxiv: arXiv identifier (``"2303.16900"``), or None.
      code: the official repository's URL, or None.
    """

    title: str
    arxiv: str | None = None
    code: str | None = None

    @property
    def url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else self.code


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a registration declares about one model (`model_info`, ``list_models(describe=True)``).

    Attributes:
      name: the registry name.
      paper: the `Paper`, or None for the project's own demo models.
      published_params: the parameter count the paper, its official code or timm publishes for
        this preset at its defaults (the registry test asserts it with `jax.eval_shape`), or
        None when there is none.
      params_source: where ``published_params`` comes from, or why there is none.
      params_rtol: relative tolerance of the count check (0: exact; 0.005 where the paper
        rounds, e.g. "4.2M").
      weights: where converted weights can be imported from (``"timm"``: see
        `jaxblocks.interop.timm`), or None.
      tiny: overrides (config fields or module attributes) that give a small model of the same
        structure; the registry test runs init, apply and gradients on it (the preset itself only
        through `jax.eval_shape`), and ``example_input(name, **tiny)`` matches it.
      doc: the factory's docstring.
    """

    name: str
    paper: Paper | None = None
    published_params: int | None = None
    params_source: str = ""
    params_rtol: float = 0.0
    weights: str | None = None
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    doc: str = ""

    @property
    def arxiv(self) -> str | None:
        return self.paper.arxiv if self.paper else None


def _check_metadata(
    name: str, published_params: int | None, params_source: str, params_rtol: float
) -> None:
    if published_params is not None and (
        not isinstance(published_params, int) or published_params <= 0
    ):
        raise ValueError(
            f"register_model({name!r}): published_params must be a positive int or None, "
            f"got {published_params!r}"
        )
    if not isinstance(params_source, str) or not params_source.strip():
        raise ValueError(
            f"register_model({name!r}): params_source must say where the published parameter "
            "count comes from (or why there is none)"
        )
    if not 0.0 <= params_rtol < 0.05:
        raise ValueError(f"register_model({name!r}): params_rtol must be in [0, 0.05), got "
                         f"{params_rtol!r}")  # fmt: skip


def register_model(
    name: str,
    *,
    example_input: Callable[[], Any] | None = None,
    paper: Paper | None = None,
    published_params: int | None = None,
    params_source: str,
    params_rtol: float = 0.0,
    weights: str | None = None,
    tiny: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under `name`.

    Args:
      name: registry key, lowercase with dashes or underscores (e.g. ``"resnet18"``).
      example_input: optional zero-argument callable returning a small example input
        (used by the registry tests and `jax.eval_shape` checks).
      paper, published_params, params_source, params_rtol, weights, tiny: see `ModelInfo`;
        ``params_source`` is required (where the count comes from, or why there is none).
    """
    _check_metadata(name, published_params, params_source, params_rtol)

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"register_model: name {name!r} is already registered")
        _REGISTRY[name] = factory
        _INFO[name] = ModelInfo(
            name=name,
            paper=paper,
            published_params=published_params,
            params_source=params_source,
            params_rtol=params_rtol,
            weights=weights,
            tiny=dict(tiny or {}),
            doc=(factory.__doc__ or "").strip(),
        )
        if example_input is not None:
            _EXAMPLES[name] = lambda **overrides: example_input()
        return factory

    return deco


def split_config_overrides(config: Any, kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split factory ``kwargs`` into config-field overrides and module attributes.

    Returns ``(config with the overrides applied, the remaining kwargs)``; ``config`` is a
    dataclass (frozen ones are copied with `dataclasses.replace`, which runs their validation).
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(config)}
    overrides = {k: v for k, v in kwargs.items() if k in fields}
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    return (dataclasses.replace(config, **overrides) if overrides else config), rest


def config_fields_module(cls: type[nn.Module], config: Any, **kwargs: Any) -> nn.Module:
    """``cls(**fields of config, **kwargs)`` for a module whose attributes repeat its config's
    fields (``ResNet``, ``MobileNetV2``); ``kwargs`` naming config fields override them.

    Use it as the model's ``from_config = classmethod(config_fields_module)``.
    """
    config, attributes = split_config_overrides(config, kwargs)
    return cls(**dataclasses.asdict(config), **attributes)


def _preset_factory(build: Callable[..., nn.Module], config: Any) -> Callable[..., nn.Module]:
    def factory(**kwargs: Any) -> nn.Module:
        cfg, attributes = split_config_overrides(config, kwargs)
        return build(cfg, **attributes)

    return factory


def _bind(fn: Callable[[Any], Any], config: Any) -> Callable[..., Any]:
    def example(**overrides: Any) -> Any:
        return fn(split_config_overrides(config, overrides)[0])

    return example


def register_presets(
    build: Callable[..., nn.Module],
    presets: Mapping[str, Any],
    *,
    example_input: Callable[[Any], Any] | None = None,
    doc: str = "{name}: {build} preset; kwargs override config fields and module attributes.",
    paper: Paper | None = None,
    published_params: Mapping[str, int | None] | None = None,
    params_source: str,
    params_rtol: float = 0.0,
    weights: str | None = None,
    tiny: Mapping[str, Any] | None = None,
) -> dict[str, Callable[..., nn.Module]]:
    """Register one factory per preset: ``create_model(name, **kwargs)`` builds
    ``build(config, **attributes)``.

    Keyword arguments that name fields of the preset's config override them (a new config, so
    its validation runs); the others are passed to ``build`` as module attributes.

    Args:
      build: ``build(config, **attributes) -> nn.Module``, e.g. the model class when the config
        is its ``config`` attribute, or a ``from_config`` classmethod.
      presets: registry name -> config dataclass instance.
      example_input: ``example_input(config)`` returns a small input for that preset (used by
        the registry tests), or None; ``jaxblocks.example_input(name, **overrides)`` calls it
        with the overridden config.
      doc: the factories' docstring; ``{name}`` and ``{build}`` are filled in.
      paper, params_source, params_rtol, weights, tiny: see `ModelInfo` (the same for every
        preset).
      published_params: registry name -> published count; a preset left out has none (say
        why in ``params_source``).

    Returns:
      The registered factories by name.

    Example::

        PRESETS = {"resnet18": ResNetConfig(stage_sizes=(2, 2, 2, 2), block="basic")}
        register_presets(ResNet.from_config, PRESETS, example_input=lambda cfg: image,
                         published_params={"resnet18": 11_689_512},
                         params_source="torchvision", tiny={"width": 8})
    """
    build_name = getattr(build, "__qualname__", type(build).__name__)
    published_params = dict(published_params or {})
    unknown = sorted(set(published_params) - set(presets))
    if unknown:
        raise ValueError(f"register_presets: published_params names unknown presets {unknown}")
    factories = {}
    for name, config in presets.items():
        # Rejects a preset that is not a config dataclass at import, not at create_model.
        split_config_overrides(config, {})
        factory = _preset_factory(build, config)
        factory.__name__ = factory.__qualname__ = name
        factory.__doc__ = doc.format(name=name, build=build_name)
        factories[name] = register_model(
            name,
            paper=paper,
            published_params=published_params.get(name),
            params_source=params_source,
            params_rtol=params_rtol,
            weights=weights,
            tiny=tiny,
        )(factory)
        if example_input is not None:
            _EXAMPLES[name] = _bind(example_input, config)
    return factories


def _load_all() -> None:
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)


def list_models(pattern: str = "*", *, describe: bool = False) -> list[Any]:
    """Names of the registered models matching ``pattern`` (fnmatch wildcards, as timm's
    ``list_models("resnet*")``), sorted; with ``describe=True`` their `ModelInfo` instead."""
    _load_all()
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
    return [_INFO[n] for n in names] if describe else names


def _known(fn: str, name: str) -> None:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"{fn}: unknown model {name!r}; available: {sorted(_REGISTRY)}")


def model_info(name: str) -> ModelInfo:
    """The `ModelInfo` of the registered model ``name``."""
    _known("model_info", name)
    return _INFO[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name`, passing `kwargs` to its factory."""
    _known("create_model", name)
    return _REGISTRY[name](**kwargs)


def example_input(name: str, **overrides: Any) -> Any:
    """A small example input for model ``name``; ``overrides`` as given to `create_model`
    (config fields change the input where it depends on them, e.g. ``vocab_size``)."""
    _known("example_input", name)
    if name not in _EXAMPLES:
        raise KeyError(f"example_input: model {name!r} registered no example input")
    return _EXAMPLES[name](**overrides)
