"""timm (PyTorch) state dicts -> Flax variables of the registered jaxblocks models.

`load_timm_state_dict(name, state_dict)` builds the registered model ``name`` abstractly
(`jax.eval_shape`, nothing allocated), walks its variables, and for each leaf looks up the timm
tensor it comes from. Two small tables drive the mapping, so another timm family is one entry:

* `LEAF_RULES`: Flax leaf (collection, name, rank) -> timm leaf name and layout transform
  (conv OIHW -> HWIO, linear [out, in] -> [in, out], BatchNorm/LayerNorm ``weight`` -> ``scale``,
  ``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``, anything else as is);
* `TIMM_FAMILIES`: per family of registry names, regex renames of module paths (after the
  generic rule that a Flax module ``stages_1`` is torch's ``stages.1``), the timm keys with no
  Flax counterpart (``num_batches_tracked``), and the classifier key from which ``num_classes``
  is inferred.

torch is never imported: tensors are converted through their ``detach().cpu().numpy()``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.registry import create_model, example_input

__all__ = [
    "LEAF_RULES",
    "TIMM_FAMILIES",
    "TimmFamily",
    "convert",
    "load",
    "load_timm_state_dict",
    "read_state_dict",
    "timm_key",
]


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """How one kind of Flax leaf is found in a timm state dict.

    Attributes:
      collection: Flax collection (``"params"``, ``"batch_stats"``).
      name: Flax leaf name (``"kernel"``), or ``"*"`` for any.
      ndim: rank of the Flax leaf the rule applies to, or None for any.
      torch_name: the timm leaf name (None: the Flax name).
      to_flax: timm array -> Flax layout.
    """

    collection: str
    name: str
    ndim: int | None
    torch_name: str | None
    to_flax: Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


LEAF_RULES: tuple[LeafRule, ...] = (
    # conv2d (O, I/groups, kH, kW) -> (kH, kW, I/groups, O); depthwise: (kH, kW, 1, C)
    LeafRule("params", "kernel", 4, "weight", lambda a: np.transpose(a, (2, 3, 1, 0))),
    # conv1d (O, I/groups, k) -> (k, I/groups, O)
    LeafRule("params", "kernel", 3, "weight", lambda a: np.transpose(a, (2, 1, 0))),
    # linear (out, in) -> (in, out)
    LeafRule("params", "kernel", 2, "weight", lambda a: np.transpose(a, (1, 0))),
    LeafRule("params", "scale", None, "weight", _identity),  # BatchNorm / LayerNorm affine
    LeafRule("params", "bias", None, "bias", _identity),
    LeafRule("batch_stats", "mean", None, "running_mean", _identity),
    LeafRule("batch_stats", "var", None, "running_var", _identity),
    LeafRule("params", "*", None, None, _identity),  # e.g. layer scale ``gamma``
)


@dataclasses.dataclass(frozen=True)
class TimmFamily:
    """A family of registry names whose timm state dicts map onto their Flax variables.

    Attributes:
      pattern: fnmatch pattern of the registry names (``"inception_next_*"``); the registry
        name is the timm model name.
      renames: ``(regex, replacement)`` pairs applied in order to the timm key derived from the
        Flax path by `timm_key` (for modules named differently from timm's).
      ignore: regexes of timm keys that have no Flax counterpart.
      classifier: timm key of the classifier weight ``[num_classes, features]``; when the
        caller does not pass ``num_classes``, it is read from this tensor's first dimension
        (0 when the key is absent: timm's ``num_classes=0``).
      key_fn: ``(flax module path, flax leaf name, timm leaf name) -> timm key`` replacing
        `timm_key` and ``renames``, for families where one Flax module holds several torch
        modules (a `ConvBN` is torch's conv and its BatchNorm).
    """

    pattern: str
    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = (r"\.num_batches_tracked$",)
    classifier: str | None = None
    key_fn: Callable[[tuple[str, ...], str, str], str] | None = None


def _resnet_key(modules: tuple[str, ...], name: str, torch_leaf: str) -> str:
    """timm/torchvision ResNet key of a leaf of `jaxblocks.models.resnet.ResNet`.

    A Flax `ConvBN` ``conv<i>`` holds torch's ``conv<i>`` (the kernel) and ``bn<i>`` (scale,
    bias, running statistics); ``downsample`` holds ``downsample.0`` and ``downsample.1``.
    """
    *parents, last = modules
    if last.startswith("conv") or last == "downsample":
        is_conv = name == "kernel"
        if last == "downsample":
            last = "downsample.0" if is_conv else "downsample.1"
        elif not is_conv:
            last = "bn" + (last[len("conv") :] or "1")
        modules = (*parents, last)
    return timm_key(modules, torch_leaf)


TIMM_FAMILIES: list[TimmFamily] = [
    # jaxblocks.models.inception_next names its modules as timm's MetaNeXt: no renames.
    TimmFamily("inception_next_*", classifier="head.fc2.weight"),
    # jaxblocks.models.nextvit mirrors timm's NextViT names; only the classifier Dense is flat.
    TimmFamily("nextvit_*", renames=((r"^head_fc\.", "head.fc."),), classifier="head.fc.weight"),
    # resnet18/34/50: timm's names are torchvision's, so both load.
    TimmFamily("resnet[135][048]", classifier="fc.weight", key_fn=_resnet_key),
]


def _family(model_name: str) -> TimmFamily:
    for family in TIMM_FAMILIES:
        if fnmatch.fnmatchcase(model_name, family.pattern):
            return family
    raise ValueError(
        f"load_timm_state_dict: model_name {model_name!r} has no timm mapping; supported: "
        f"{[f.pattern for f in TIMM_FAMILIES]} (add a TimmFamily to TIMM_FAMILIES)"
    )


_INDEXED = re.compile(r"^(.+)_(\d+)$")


def timm_key(path: tuple[str, ...], torch_leaf: str, renames=()) -> str:
    """The timm key of a Flax leaf: modules ``name_<i>`` become torch's ``name.<i>``
    (``("stages_1", "blocks_0", "norm")`` -> ``"stages.1.blocks.0.norm"``), the leaf name is
    appended, then ``renames`` (regex, replacement) are applied in order."""
    parts = [_INDEXED.sub(r"\1.\2", p) for p in path]
    key = ".".join([*parts, torch_leaf])
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _rule(collection: str, name: str, ndim: int) -> LeafRule:
    for rule in LEAF_RULES:
        if rule.collection == collection and rule.name in (name, "*") and rule.ndim in (None, ndim):
            return rule
    raise ValueError(f"load_timm_state_dict: no LEAF_RULES entry for {collection}/{name} "
                     f"of rank {ndim}")  # fmt: skip


def _to_numpy(value: Any) -> np.ndarray:
    """numpy array from a numpy array, jax array or torch tensor (without importing torch)."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _mismatch_message(model_name: str, missing, unexpected, shapes) -> str:
    def listing(items, n=20):
        items = sorted(items)
        more = f" ... and {len(items) - n} more" if len(items) > n else ""
        return ", ".join(items[:n]) + more

    lines = [f"load_timm_state_dict({model_name!r}): the state dict does not fit the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if shapes:
        lines.append(
            f"  shape mismatches ({len(shapes)}; timm shape -> converted, expected): "
            + listing(shapes)
        )
    lines.append("  (pass the model's config overrides, e.g. num_classes=..., as keyword args)")
    return "\n".join(lines)


def load_timm_state_dict(
    model_name: str, state_dict: Mapping[str, Any], **overrides: Any
) -> dict[str, Any]:
    """Convert a timm state dict to the Flax variables of the registered model ``model_name``.

    Imports trained timm weights (InceptionNeXt, https://arxiv.org/abs/2303.16900, Next-ViT,
    https://arxiv.org/abs/2207.05501, ResNet-18/34/50 with timm's or torchvision's keys, and any
    family added to `TIMM_FAMILIES`) into the jaxblocks model of the same name, channels-last.

    Args:
      model_name: registry name, equal to timm's model name (``"inception_next_atto"``).
      state_dict: timm key -> numpy array, jax array or torch tensor, e.g.
        ``timm.create_model(model_name, pretrained=True).state_dict()``.
      **overrides: config fields / module attributes of the model (as `create_model`); when
        ``num_classes`` is not given it is read from the classifier weight.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (every collection the model has) as jax arrays in
      the model's parameter dtypes, for ``create_model(model_name, **overrides).apply``.

    Raises:
      ValueError: naming the missing keys, the unexpected keys and the shape mismatches.

    Example::

        sd = timm.create_model("inception_next_atto", pretrained=True).state_dict()
        variables = load_timm_state_dict("inception_next_atto", sd)
        model = jaxblocks.create_model("inception_next_atto")
        logits = model.apply(variables, images_nhwc, train=False)
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"load_timm_state_dict: state_dict must be a mapping of names to "
                         f"arrays, got {type(state_dict).__name__}")  # fmt: skip
    family = _family(model_name)
    overrides = dict(overrides)
    if family.classifier is not None and "num_classes" not in overrides:
        head = state_dict.get(family.classifier)
        overrides["num_classes"] = int(_to_numpy(head).shape[0]) if head is not None else 0
    model = create_model(model_name, **overrides)
    x = example_input(model_name, **overrides)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))

    used: set[str] = set()
    missing: list[str] = []
    shapes: list[str] = []

    def convert(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        collection, modules, name = names[0], names[1:-1], names[-1]
        rule = _rule(collection, name, leaf.ndim)
        torch_leaf = rule.torch_name or name
        if family.key_fn is not None:
            key = family.key_fn(modules, name, torch_leaf)
        else:
            key = timm_key(modules, torch_leaf, family.renames)
        if key not in state_dict:
            missing.append(key)
            return None
        used.add(key)
        source = _to_numpy(state_dict[key])
        value = rule.to_flax(source) if source.ndim == leaf.ndim else source
        if value.shape != leaf.shape:
            shapes.append(f"{key} {tuple(source.shape)} -> {tuple(value.shape)}, "
                          f"expected {tuple(leaf.shape)}")  # fmt: skip
            return None
        return jnp.asarray(value, dtype=leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(convert, abstract)
    ignored = [re.compile(p) for p in family.ignore]
    unexpected = [k for k in state_dict if k not in used and not any(p.search(k) for p in ignored)]
    if missing or unexpected or shapes:
        raise ValueError(_mismatch_message(model_name, missing, unexpected, shapes))
    return variables


# `convert(name, state_dict)`: the name the issue and most users look for.
convert = load_timm_state_dict


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict (key -> NumPy array) from a ``.safetensors`` or ``.npz`` file, without torch.

    ``.safetensors`` is read with the ``safetensors`` package's NumPy loader (part of the
    ``torch`` extra; bfloat16 tensors need torch to be read); ``.npz`` with `numpy.load`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_state_dict: path {path!r} is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "read_state_dict: reading .safetensors needs the `safetensors` package "
                "(pip install 'jaxblocks[torch]' or pip install safetensors)"
            ) from e
        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    raise ValueError(f"read_state_dict: path {path!r} must end in .safetensors or .npz")


def load(model_name: str, path: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """`load_timm_state_dict` of the state dict stored at ``path`` (`read_state_dict`).

    Example::

        # once, where torch is installed:
        #   safetensors.torch.save_file(timm_model.state_dict(), "atto.safetensors")
        variables = jaxblocks.interop.timm.load("inception_next_atto", "atto.safetensors")
    """
    return load_timm_state_dict(model_name, read_state_dict(path), **overrides)
