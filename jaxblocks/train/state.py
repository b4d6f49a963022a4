"""Train state: params, the model's other collections, optimizer state, step and RNG, sharded.

Shapes come from `jax.eval_shape` (nothing is allocated to find them); the state is then built by
one `jax.jit(init, out_shardings=...)` call, so every leaf is born on its devices and never sits
whole on one host. Every leaf — the step counter and RNG included — is a global array with a
`NamedSharding`, which is what orbax needs for multi-host checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxblocks.train import sharding as shd


@struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: model parameters (fp32).
      collections: every other variable collection the model's ``init`` returns, by name
        (``{"batch_stats": ..., "power_norm_backward": ...}``; ``{}`` for a stateless model).
        Flax's ``"intermediates"`` (a per-call output of ``sow``, not state) is not kept.
      opt_state: optax state.
      rng: raw ``uint32[2]`` key data; the step's key is ``fold_in(rng, step)``, so resuming at a
        step reproduces its randomness exactly.
      x_adv: ConAdv only: adversarial inputs for the current batch, made at the previous step
        with the then-current (now stale) parameters; ``None`` otherwise.
    """

    step: jax.Array
    params: Any
    collections: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    x_adv: Any = None

    @property
    def batch_stats(self) -> Any:
        """The ``batch_stats`` collection (``{}`` when the model has none)."""
        return self.collections.get("batch_stats", {})

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params": ..., **collections}``: what ``model.apply`` takes."""
        return {"params": self.params, **self.collections}


# A per-call output (`nn.Module.sow`), not state carried from step to step.
NOT_STATE = ("intermediates",)


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(params, collections)``: the model's variables without the non-state collections."""
    collections = {k: v for k, v in variables.items() if k != "params" and k not in NOT_STATE}
    return variables["params"], collections


def init_variables(
    model: nn.Module, key: jax.Array, example: jax.Array, call_kwargs: Mapping[str, Any]
) -> Any:
    """`model.init` (boxed: keeps `nn.LogicallyPartitioned` metadata for the sharding rules)."""
    return model.init(key, example, **dict(call_kwargs))


def abstract_variables(model, key, example, call_kwargs) -> Any:
    return jax.eval_shape(lambda k: init_variables(model, k, example, call_kwargs), key)


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example: jax.Array,
    call_kwargs: Mapping[str, Any],
    *,
    x_adv_shape: tuple[tuple[int, ...], Any] | None = None,
    params_transform: Callable[[Any, Any, jax.Array], Any] | None = None,
) -> Callable[[jax.Array], TrainState]:
    """``init(key_data) -> TrainState`` (pure; jit it with `out_shardings`)."""

    def init(key_data: jax.Array) -> TrainState:
        key = jax.random.wrap_key_data(key_data)
        k_init, k_extra = jax.random.split(key)
        variables = shd.strip_boxes(init_variables(model, k_init, example, call_kwargs))
        params, collections = split_variables(variables)
        if params_transform is not None:
            params = params_transform(params, collections, k_extra)
        x_adv = None
        if x_adv_shape is not None:
            x_adv = jnp.zeros(x_adv_shape[0], x_adv_shape[1])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            collections=collections,
            opt_state=tx.init(params),
            rng=key_data,
            x_adv=x_adv,
        )

    return init


def state_shardings(
    abstract_state: TrainState, boxed_variables: Any, mesh: jax.sharding.Mesh
) -> TrainState:
    """`NamedSharding` for every leaf of ``abstract_state`` (every collection follows the
    model's logical axis names, or the FSDP default, like the parameters)."""
    var_sh = shd.param_shardings(boxed_variables, mesh)
    params_sh = var_sh["params"]
    coll_sh = {k: var_sh[k] for k in abstract_state.collections}
    rep = NamedSharding(mesh, P())
    opt_sh = shd.opt_state_shardings(
        abstract_state.opt_state, params_sh, abstract_state.params, mesh
    )
    x_adv_sh = None
    if abstract_state.x_adv is not None:
        x_adv_sh = shd.batch_sharding(mesh, abstract_state.x_adv.ndim)
    return TrainState(
        step=rep,
        params=params_sh,
        collections=coll_sh,
        opt_state=opt_sh,
        rng=rep,
        x_adv=x_adv_sh,
    )


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s carrying the target shardings (the restore target for orbax)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def create_state(
    init_fn: Callable[[jax.Array], TrainState],
    seed: int,
    boxed_variables: Any,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, TrainState, TrainState]:
    """Build the sharded state. Returns ``(state, shardings, abstract_state)``."""
    key_data = jax.random.key_data(jax.random.key(seed))
    abstract = jax.eval_shape(init_fn, key_data)
    sh = state_shardings(abstract, boxed_variables, mesh)
    key_data = jax.device_put(key_data, NamedSharding(mesh, P()))
    state = jax.jit(init_fn, out_shardings=sh)(key_data)
    return state, sh, abstract


def merge_params(target: Any, source: Any, reinit: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """Copy leaves of ``source`` into ``target`` where path and shape match (transfer learning).

    Top-level names in ``reinit`` keep ``target``'s fresh initialisation. Returns the merged tree
    and the list of paths that were *not* copied.
    """
    src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}
    kept: list[str] = []

    def one(path, t):
        k = jax.tree_util.keystr(path)
        top = str(getattr(path[0], "key", path[0])) if path else ""
        s = src.get(k)
        if top in reinit or s is None or tuple(s.shape) != tuple(t.shape):
            kept.append(k)
            return t
        # A copy, never an alias: the train step donates the state, and the source (e.g. the
        # previous stage's final state) must survive.
        return jax.device_put(s, t.sharding if hasattr(t, "sharding") else None, may_alias=False)

    return jax.tree_util.tree_map_with_path(one, target), kept


def start_from(
    state: TrainState, variables: Mapping[str, Any], reinit: tuple[str, ...], shardings: Any
) -> TrainState:
    """``state`` with the params and collections of ``variables`` copied in (`merge_params`;
    top-level param names in ``reinit`` keep their fresh initialisation), placed on
    ``shardings``."""
    params, _ = merge_params(state.params, variables["params"], reinit)
    collections = {
        k: merge_params(v, variables.get(k, {}))[0] for k, v in state.collections.items()
    }
    return jax.device_put(state.replace(params=params, collections=collections), shardings)
