"""Model registry: `register_model`, `create_model`, `list_models`.

Models register a factory under a name; `create_model(name, **overrides)` builds the Linen
module. The trainer and the registry tests reach models only through here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUTS: dict[str, Callable[[], Any]] = {}
# Modules whose import registers models; imported lazily so `import jaxblocks` stays light.
_MODEL_MODULES: tuple[str, ...] = ("jaxblocks.models",)


def register_model(
    name: str, *, example_input: Callable[[], Any] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under `name`.

    Args:
      name: registry key, lowercase with dashes or underscores (e.g. ``"resnet18"``).
      example_input: optional zero-argument callable returning a small example input
        (used by the registry tests and `jax.eval_shape` checks).
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"register_model: name {name!r} is already registered")
        _REGISTRY[name] = factory
        if example_input is not None:
            _DEFAULT_INPUTS[name] = example_input
        return factory

    return deco


def _load_all() -> None:
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name`, passing `kwargs` to its factory."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"create_model: unknown model {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def example_input(name: str) -> Any:
    """A small example input for model `name` (raises if the model registered none)."""
    _load_all()
    if name not in _DEFAULT_INPUTS:
        raise KeyError(f"example_input: model {name!r} registered no example input")
    return _DEFAULT_INPUTS[name]()
