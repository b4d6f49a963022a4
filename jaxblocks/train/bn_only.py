"""BN-only training (Frankle, Schwab, Morcos 2021, https://arxiv.org/abs/2003.00152).

Train BatchNorm and only BatchNorm: every parameter but the normalization affine ``γ, β`` keeps
its random initialisation. `bn_only_mask` finds the norm parameters, `bn_only_optimizer` wraps an
optax transformation so the rest get `optax.set_to_zero` updates (`optax.multi_transform` over
`bn_only_labels`), and `bn_only_init` re-initialises ``γ, β`` as the paper's code (open_lth) does.
The trainer uses them for ``optimizer.freeze = "bn_only"`` (`jaxblocks.train.optim`); the layers
themselves know nothing of optimizers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

BN_ONLY_INIT_SCHEMES = ("uniform", "fixed", "positivenegative", "oneone")


def _path_names(path: tuple) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "name", None)
        if name is None:
            name = getattr(k, "idx", k)
        out.append(str(name))
    return tuple(out)


def _is_box(x: Any) -> bool:
    # Logically-partitioned params (nn.Partitioned) count as one leaf, so masks and re-inits
    # work on boxed and unboxed trees alike (a bool in a box's place is a valid optax prefix).
    return isinstance(x, nn.meta.AxisMetadata)


def _bn_leaf_paths(params: Any, norm_leaves: Sequence[str]) -> set[tuple[str, ...]]:
    """Paths of `scale`-style leaves: a module that has a ``scale`` leaf is a norm module."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    paths = {_path_names(p) for p, _ in flat}
    modules_with_scale = {p[:-1] for p in paths if p and p[-1] == "scale"}
    return {p for p in paths if p and p[-1] in norm_leaves and p[:-1] in modules_with_scale}


def bn_only_mask(
    params: Any,
    *,
    extra_trainable: Sequence[str] = (),
    norm_leaves: Sequence[str] = ("scale", "bias"),
) -> Any:
    """Trainable mask for BN-only training (Frankle et al. 2021, https://arxiv.org/abs/2003.00152).

    Returns a pytree like ``params`` with True for the normalization affine parameters and False
    for everything else. A leaf counts as a norm parameter when its name is in ``norm_leaves``
    (``scale``/``bias``) and its module also holds a ``scale`` leaf — so BatchNorm modules
    (and BN parameters stored next to a ``kernel``, as in a fused ConvBN) are trainable, while a
    Conv/Dense ``bias`` (no ``scale`` next to it) is frozen. Note that this also selects other
    norms with a ``scale`` (LayerNorm, GroupNorm); pass a narrower ``params`` subtree or post-edit
    the mask if that matters.

    Args:
      params: parameter tree (boxed `nn.Partitioned` leaves count as one leaf each).
      extra_trainable: regular expressions matched (``re.search``) against the ``/``-joined
        path, e.g. ``("^head/",)`` to also train the output layer (the paper's "output layer
        trainable" variant; default: frozen, the BN-only setting).
      norm_leaves: leaf names that count as the norm's affine parameters.

    Returns:
      A bool tree like ``params``. Use it as ``optax.masked(tx, mask)`` for the trainable part
      plus zeroed updates for the rest — `bn_only_optimizer` does exactly that.

    Example::

      params = {"conv": {"kernel": w, "bias": b}, "bn": {"scale": g, "bias": be}}
      bn_only_mask(params)  # {"conv": {"kernel": False, "bias": False},
                            #  "bn": {"scale": True, "bias": True}}
    """
    norm = _bn_leaf_paths(params, tuple(norm_leaves))
    pats = [re.compile(p) for p in extra_trainable]

    def label(path, _):
        names = _path_names(path)
        return names in norm or any(p.search("/".join(names)) for p in pats)

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def bn_only_labels(params: Any, **kwargs: Any) -> Any:
    """`bn_only_mask` as `optax.multi_transform` labels: ``"trainable"`` / ``"frozen"``."""
    mask = bn_only_mask(params, **kwargs)
    return jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask, is_leaf=_is_box)


def bn_only_optimizer(
    tx: optax.GradientTransformation, params: Any, **kwargs: Any
) -> optax.GradientTransformation:
    """``tx`` on the BN affine parameters, zero updates (frozen) everywhere else.

    Args:
      tx: the optimizer of the trainable parameters.
      params: (abstract) parameter tree, for the labels.
      **kwargs: passed to `bn_only_mask` (``extra_trainable``, ``norm_leaves``).
    """
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()}, bn_only_labels(params, **kwargs)
    )


def bn_only_init(
    params: Any,
    key: jax.Array,
    scheme: Literal["uniform", "fixed", "positivenegative", "oneone"] = "uniform",
    **kwargs: Any,
) -> Any:
    """Re-initialize the BN affine parameters (as `bn_only_mask` finds them, without
    ``extra_trainable``) following the paper's code.

    open_lth ``bn_initializers``: ``uniform`` (γ ~ U[0, 1], β = 0; the paper's default for
    ResNets), ``fixed`` (γ = 1, β = 0), ``oneone`` (γ = 1, β = 1), ``positivenegative``
    (γ ~ U[−1, 1], β = 0). Other parameters are returned unchanged; boxes are kept.

    Args:
      params: parameter tree.
      key: PRNG key for the random schemes.
      scheme: one of `BN_ONLY_INIT_SCHEMES`.
      **kwargs: ``norm_leaves`` as in `bn_only_mask`.
    """
    if scheme not in BN_ONLY_INIT_SCHEMES:
        raise ValueError(
            f"bn_only_init: unknown scheme {scheme!r}; choose one of {BN_ONLY_INIT_SCHEMES}"
        )
    norm = _bn_leaf_paths(params, tuple(kwargs.get("norm_leaves", ("scale", "bias"))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, box), k in zip(leaves, keys, strict=True):
        names = _path_names(path)
        name = names[-1]
        leaf = box.unbox() if _is_box(box) else box
        if names not in norm or name not in ("scale", "bias"):
            out.append(box)
            continue
        if name == "bias":
            new = jnp.full_like(leaf, 1.0 if scheme == "oneone" else 0.0)
        elif scheme == "uniform":
            new = jax.random.uniform(k, leaf.shape, leaf.dtype, 0.0, 1.0)
        elif scheme == "positivenegative":
            new = jax.random.uniform(k, leaf.shape, leaf.dtype, -1.0, 1.0)
        else:
            new = jnp.ones_like(leaf)
        out.append(box.replace_boxed(new) if _is_box(box) else new)
    return jax.tree_util.tree_unflatten(treedef, out)
