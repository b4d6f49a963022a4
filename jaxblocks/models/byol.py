"""BYOL-style self-supervised learning with DirectPred's closed-form predictor — Tian, Chen &
Ganguli, "Understanding Self-supervised Learning Dynamics without Contrastive Pairs", ICML 2021,
https://arxiv.org/abs/2102.06810 (BYOL: Grill et al., https://arxiv.org/abs/2006.07733).
Official code: facebookresearch/luckmatters ``ssl/real-dataset/byol_trainer.py``.

`BYOL` is a whole self-supervised step in one Linen call, so the one trainer runs it as the
``self_supervised`` task: two augmented views are drawn inside the model, the online branch
(any registered encoder + projector MLP + predictor) predicts the target branch's projection of
the other view, and the model returns the per-example loss. The target branch is an EMA copy of
the online encoder + projector kept in the non-parameter collection ``"target"`` and updated in
the training call; DirectPred's predictor state lives in ``"directpred"``
(`jaxblocks.layers.directpred`). Both collections are mutable in the trainer's training step and
come back updated; neither is ever given to the optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.directpred import DirectPredictor
from jaxblocks.registry import Paper, create_model, register_model
from jaxblocks.typing import Array, Float

__all__ = [
    "BYOL",
    "PREDICTORS",
    "TARGET_COLLECTION",
    "ProjectionMLP",
    "augment_views",
    "byol_loss",
    "encode",
    "target_tau",
]

TARGET_COLLECTION = "target"
PREDICTORS = ("directpred", "linear", "mlp")
# PyTorch BatchNorm1d defaults (momentum 0.1 as decay 0.9, eps 1e-5) as in the official heads.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5
# The fixed key that draws the views when the call has no "augment"/"dropout" RNG (evaluation,
# init): the evaluation loss is then deterministic.
EVAL_AUGMENT_SEED = 0


def byol_loss(p: Float[Array, "B D"], z: Float[Array, "B D"]) -> Float[Array, " B"]:
    """BYOL's normalised regression loss ``2 − 2·cos(p, z) = ‖p/‖p‖ − z/‖z‖‖²`` per example, in
    [0, 4], fp32 (norms floored at 1e-12 as `torch.nn.functional.normalize`)."""
    p = p.astype(jnp.float32)
    z = z.astype(jnp.float32)
    pn = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return 2.0 - 2.0 * jnp.sum(pn * zn, axis=-1)


def target_tau(step: Array, tau: float, schedule_steps: int = 0) -> Array:
    """The EMA decay of the target at ``step``: ``tau`` (fixed, the official DirectPred code's
    ``m = 0.996``) or, with ``schedule_steps = K > 0``, BYOL's schedule
    ``1 − (1 − tau)(cos(π k / K) + 1) / 2`` (k clipped to K), rising from ``tau`` to 1."""
    if schedule_steps <= 0:
        return jnp.asarray(tau, jnp.float32)
    k = jnp.minimum(step.astype(jnp.float32), float(schedule_steps))
    return 1.0 - (1.0 - tau) * (jnp.cos(math.pi * k / schedule_steps) + 1.0) / 2.0


def augment_views(
    key: jax.Array, x: Float[Array, "B H W C"], max_shift: int = 1, noise_std: float = 0.1
) -> Float[Array, "B H W C"]:
    """One random view of small images: a random translation by up to ``max_shift`` pixels
    (zero-padded crop, as a padded random crop on 8×8 digits) and additive Gaussian noise of
    standard deviation ``noise_std`` (each example its own draw)."""
    b, h, w, _ = x.shape
    k_shift, k_noise = jax.random.split(key)
    if max_shift > 0:
        m = max_shift
        padded = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
        offs = jax.random.randint(k_shift, (b, 2), 0, 2 * m + 1)

        def crop(img, o):
            return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))

        x = jax.vmap(crop)(padded, offs)
    if noise_std > 0:
        x = x + noise_std * jax.random.normal(k_noise, x.shape, x.dtype)
    return x


def _takes_train(module: nn.Module) -> bool:
    params = inspect.signature(type(module).__call__).parameters
    return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class ProjectionMLP(nn.Module):
    """The official projector / predictor head: Dense → BatchNorm (no affine, the official
    ``has_bn_affine: false``) → ReLU → Dense, both Dense with bias.

    Attributes:
      hidden: hidden width (``mlp_hidden_size``; 512 in the official STL-10 config).
      features: output width (``projection_size``; 128).
      dtype: compute dtype (parameters stay fp32).
    """

    hidden: int = 512
    features: int = 128
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B D"], train: bool = False) -> Float[Array, "B F"]:
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
            use_scale=False, use_bias=False, dtype=self.dtype, name="bn",
        )(x)  # fmt: skip
        x = nn.relu(x)
        return nn.Dense(self.features, dtype=self.dtype, name="fc2")(x)


class _Branch(nn.Module):
    """Encoder (a registered model, its ``num_classes`` output as the representation) followed
    by the projector: returns ``(representation, projection)``."""

    encoder: str
    encoder_kwargs: Any
    feature_dim: int
    projection_hidden: int
    projection_dim: int
    dtype: Any = None

    def encoder_module(self) -> nn.Module:
        kw = dict(self.encoder_kwargs or {})
        if self.dtype is not None:
            kw["dtype"] = self.dtype
        return create_model(self.encoder, num_classes=self.feature_dim, parent=None, **kw)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        enc = self.encoder_module().clone(parent=self, name="encoder")
        y = enc(x, train=train) if _takes_train(enc) else enc(x)
        z = ProjectionMLP(self.projection_hidden, self.projection_dim, self.dtype,
                          name="projector")(y, train)  # fmt: skip
        return y, z


class BYOL(nn.Module):
    """BYOL with DirectPred's predictor (Tian et al., https://arxiv.org/abs/2102.06810).

    One call is one self-supervised step: two views ``v1, v2`` of the batch (`augment_views`,
    from the ``"augment"`` or else ``"dropout"`` RNG; a fixed key without either), online
    projections ``z = projector(encoder(v))``, predictions ``p(z)`` and the target branch's
    projections ``t`` (EMA weights from the ``"target"`` collection, no gradient). The
    per-example loss is the symmetrised ``½[(2 − 2 cos(p(z1), sg(t2))) + (2 − 2 cos(p(z2),
    sg(t1)))]`` in [0, 4] (the official code sums the two ``−2 cos`` terms: twice ours minus a
    constant, i.e. only a learning-rate factor of 2).

    With ``train=True`` and mutable collections (the trainer's training step) the call also
    updates the target, ``ξ ← τ ξ + (1 − τ) θ`` (`target_tau`), and, for ``predictor=
    "directpred"``, the predictor's correlation EMA and weight (`DirectPredictor`). Deviation:
    the update uses the online weights θ this step starts from (the trainer applies the
    optimizer after the model call), while the official code averages in the weights right after
    the optimizer step: the target lags the official one by one step. The target's BatchNorm
    running statistics come from its own forward passes, as in the official ``deepcopy``. With
    the trainer's gradient accumulation (``accum_steps > 1``) the target and DirectPred's F
    advance once per microbatch.

    Predictors: ``"directpred"`` (closed form, no parameters, applied to both views' projections
    together so F sees the whole batch as the official ``Accumulator``), ``"linear"`` (learned,
    no bias: the paper's linear baseline) and ``"mlp"`` (learned `ProjectionMLP`: BYOL's default).

    Attributes:
      encoder: registry name of the encoder; it is built with ``num_classes=feature_dim`` and
        its output is the representation (``train`` is passed when it takes one).
      encoder_kwargs: more keyword arguments of the encoder (a mapping or None).
      feature_dim: representation width (the encoder's output).
      projection_hidden, projection_dim: the projector (and ``"mlp"`` predictor) widths.
      predictor: one of `PREDICTORS`.
      tau: target EMA decay (the official ``m = 0.996``); ``tau_schedule_steps`` > 0 uses BYOL's
        cosine schedule from ``tau`` to 1 over that many steps.
      rho, eps, freq: DirectPred's ``dyn_lambda`` (0.3), ``dyn_eps`` (0.01), ``predictor_freq``
        (1).
      max_shift, noise_std: the views' random translation (pixels) and Gaussian noise.
      dtype: compute dtype (parameters and the EMA states stay fp32); the loss is returned in it.

    Example:
      >>> m = BYOL(encoder="mlp_tiny", feature_dim=16, projection_hidden=32, projection_dim=8)
      >>> x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
      >>> v = m.init(jax.random.key(1), x)
      >>> sorted(v)
      ['batch_stats', 'directpred', 'params', 'target']
      >>> loss, new = m.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
      ...                     mutable=["batch_stats", "directpred", "target"])
      >>> loss.shape
      (4,)
    """

    encoder: str = "cnn_tiny"
    encoder_kwargs: Any = None
    feature_dim: int = 64
    projection_hidden: int = 128
    projection_dim: int = 32
    predictor: str = "directpred"
    tau: float = 0.996
    tau_schedule_steps: int = 0
    rho: float = 0.3
    eps: float = 0.01
    freq: int = 1
    max_shift: int = 1
    noise_std: float = 0.1
    dtype: Any = None

    def _check(self, x: jax.Array) -> None:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"BYOL: predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"BYOL: x must be floating images [B, H, W, C], got shape {x.shape} "
                             f"and dtype {x.dtype}")  # fmt: skip
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"BYOL: tau must be in [0, 1], got {self.tau}")
        if self.max_shift < 0 or self.noise_std < 0:
            raise ValueError(f"BYOL: max_shift and noise_std must be >= 0, got {self.max_shift} "
                             f"and {self.noise_std}")  # fmt: skip
        if self.encoder_kwargs is not None and not hasattr(self.encoder_kwargs, "items"):
            raise ValueError(f"BYOL: encoder_kwargs must be a mapping or None, got "
                             f"{type(self.encoder_kwargs).__name__}")  # fmt: skip

    def _branch(self, **kw: Any) -> _Branch:
        return _Branch(self.encoder, self.encoder_kwargs, self.feature_dim,
                       self.projection_hidden, self.projection_dim, self.dtype, **kw)  # fmt: skip

    def encoder_module(self) -> nn.Module:
        """The unbound encoder as built inside the model (`encode` applies it)."""
        return self._branch(parent=None).encoder_module()

    def _views(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.has_rng("augment"):
            key = self.make_rng("augment")
        elif self.has_rng("dropout"):
            key = self.make_rng("dropout")
        else:
            key = jax.random.key(EVAL_AUGMENT_SEED)
        k1, k2 = jax.random.split(key)
        return (augment_views(k1, x, self.max_shift, self.noise_std),
                augment_views(k2, x, self.max_shift, self.noise_std))  # fmt: skip

    def _predict(self, z1: jax.Array, z2: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        d = self.projection_dim
        if self.predictor == "directpred":
            pred = DirectPredictor(self.rho, self.eps, self.freq, dtype=self.dtype,
                                   name="predictor")  # fmt: skip
            p = pred(jnp.concatenate([z1, z2], 0), update=train)
            return p[: z1.shape[0]], p[z1.shape[0] :]
        if self.predictor == "linear":
            lin = nn.Dense(d, use_bias=False, dtype=self.dtype, name="predictor")
            return lin(z1), lin(z2)
        mlp = ProjectionMLP(self.projection_hidden, d, self.dtype, name="predictor")
        return mlp(z1, train), mlp(z2, train)

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], train: bool = False) -> Float[Array, " B"]:
        self._check(x)
        v1, v2 = self._views(x)
        online = self._branch(name="online")
        _, z1 = online(v1, train)
        _, z2 = online(v2, train)
        p1, p2 = self._predict(z1, z2, train)

        # The target: an EMA copy of the online encoder + projector (all their collections).
        online_vars = {k: v for k, v in online.variables.items() if k != "intermediates"}
        target = self.variable(TARGET_COLLECTION, "variables",
                               lambda: jax.tree.map(jnp.copy, nn.unbox(online_vars)))  # fmt: skip
        count = self.variable(TARGET_COLLECTION, "step", jnp.zeros, (), jnp.int32)
        tnet = self._branch(parent=None)
        state = [k for k in target.value if k != "params"]
        updating = train and self.is_mutable_collection(TARGET_COLLECTION)
        updating = updating and not self.is_initializing()
        tv = target.value
        if state and train:  # batch statistics: running averages move (kept when updating)
            (_, t1), new_state = tnet.apply(tv, v1, train, mutable=state)
            (_, t2), new_state = tnet.apply({**tv, **new_state}, v2, train, mutable=state)
        else:
            _, t1 = tnet.apply(tv, v1, train)
            _, t2 = tnet.apply(tv, v2, train)
            new_state = {}
        t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
        loss = 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))

        if updating:
            tau = target_tau(count.value, self.tau, self.tau_schedule_steps)
            theta = jax.lax.stop_gradient(nn.unbox(online_vars["params"]))
            params = jax.tree.map(lambda xi, th: tau * xi + (1.0 - tau) * th.astype(xi.dtype),
                                  tv["params"], theta)  # fmt: skip
            target.value = {**tv, **jax.lax.stop_gradient(new_state), "params": params}
            count.value = count.value + 1
        return loss.astype(self.dtype or jnp.float32)


def encode(model: BYOL, variables: Mapping[str, Any], x: Array) -> Array:
    """The online encoder's representation of ``x`` (no augmentation; BatchNorm running
    statistics): the frozen features a linear probe is fitted on."""
    online = {k: v["online"]["encoder"] for k, v in variables.items()
              if isinstance(v, Mapping) and "online" in v}  # fmt: skip
    enc = model.encoder_module()
    kw = {"train": False} if _takes_train(enc) else {}
    return enc.apply(online, x, **kw)


def _example_image() -> Array:
    return jnp.linspace(0.0, 1.0, 2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)


_PAPER = Paper(
    "Understanding Self-supervised Learning Dynamics without Contrastive Pairs",
    arxiv="2102.06810",
    code="https://github.com/facebookresearch/luckmatters/tree/main/ssl/real-dataset",
)
_NO_COUNT = ("no published count: the encoder is any registered model (the paper's ResNet-18 on "
             "STL-10/CIFAR-10 and ResNet-50 on ImageNet)")  # fmt: skip
_TINY = {"encoder_kwargs": {"channels": (4, 8)}, "feature_dim": 8, "projection_hidden": 16,
         "projection_dim": 8}  # fmt: skip


@register_model("byol_directpred", example_input=_example_image, paper=_PAPER,
                params_source=_NO_COUNT, tiny=_TINY)  # fmt: skip
def byol_directpred(**kwargs: Any) -> BYOL:
    """BYOL with DirectPred's closed-form linear predictor (README defaults: ρ=0.3, ε=0.01,
    freq=1), a `cnn_tiny` encoder by default; kwargs set `BYOL` attributes."""
    return BYOL(**{"predictor": "directpred", **kwargs})


@register_model("byol_linear", example_input=_example_image, paper=_PAPER,
                params_source=_NO_COUNT, tiny=_TINY)  # fmt: skip
def byol_linear(**kwargs: Any) -> BYOL:
    """BYOL with a learned linear predictor (no bias), the paper's baseline for DirectPred."""
    return BYOL(**{"predictor": "linear", **kwargs})
