"""DirectPred — Tian, Chen & Ganguli, "Understanding Self-supervised Learning Dynamics without
Contrastive Pairs", ICML 2021, https://arxiv.org/abs/2102.06810.
Official code: facebookresearch/luckmatters ``ssl/real-dataset/byol_trainer.py``
(``BYOLTrainer.compute_w_corr``, ``Accumulator``, ``regulate_predictor`` with
``predictor_reg="corr"``).

DirectPred replaces BYOL's learned predictor by a linear one set in closed form from the
correlation of the online projections ``f``: an EMA ``F ← ρ F + (1 − ρ) E_batch[f fᵀ]``, its
eigendecomposition ``F = U diag(s) Uᵀ`` and ``W_p = U diag(p) Uᵀ`` with
``p_j = √(max(s_j, 0) / max_k s_k) + ε`` (clamped to ≥ 1e-4). The README's settings are the
defaults here: ρ = ``dyn_lambda`` = 0.3, ε = ``dyn_eps`` = 0.01, ``freq`` = 1,
``balance_type="boost_scale"``, ``dyn_convert=2`` (the square root), ``dyn_eps_inside=False``,
no ``dyn_noise``, no ``dyn_zero_mean``, linear predictor without bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = [
    "DIRECTPRED_COLLECTION",
    "DirectPredictor",
    "directpred_eigenvalues",
    "directpred_predictor",
    "ema_correlation",
]

# The non-parameter collection holding F, W_p and the step counter (never trained).
DIRECTPRED_COLLECTION = "directpred"
# The official clamp of the predictor's eigenvalues after adding eps (`compute_w_corr`).
MIN_EIGENVALUE = 1e-4


def _check_square(name: str, m: jax.Array) -> None:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name}: expected a square [D, D] matrix, got shape {m.shape}")
    if not jnp.issubdtype(m.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating matrix, got dtype {m.dtype}")


def directpred_eigenvalues(
    eigenvalues: Float[Array, " D"], eps: float = 0.01, power: float = 0.5,
    eps_inside: bool = False,
) -> Float[Array, " D"]:  # fmt: skip
    """DirectPred's predictor eigenvalues from the correlation's (``balance_type="boost_scale"``).

    ``p = (max(s, 0) / max(s))^power + eps`` (``eps_inside=False``, the official default) or
    ``p = max(max(s, 0) / max(s) + eps, 1e-4)^power`` (``eps_inside=True``), then clamped to
    ≥ 1e-4. ``power = 1 / dyn_convert`` (0.5: the paper's square root). A correlation with no
    positive eigenvalue (all-zero F) divides by a tiny positive number instead of 0, so p = eps.
    """
    s = eigenvalues.astype(jnp.float32)
    top = jnp.maximum(jnp.max(s), jnp.finfo(jnp.float32).tiny)
    r = jnp.maximum(s, 0.0) / top
    if eps_inside:
        p = jnp.power(jnp.maximum(r + eps, MIN_EIGENVALUE), power)
    else:
        p = jnp.power(r, power) + eps
    return jnp.maximum(p, MIN_EIGENVALUE)


def directpred_predictor(
    corr: Float[Array, "D D"], eps: float = 0.01, power: float = 0.5, eps_inside: bool = False
) -> Float[Array, "D D"]:
    """DirectPred's linear predictor ``W_p = U diag(p) Uᵀ`` from a correlation ``F = U diag(s) Uᵀ``.

    Args:
      corr: the (EMA) correlation of the online projections, symmetric ``[D, D]``; it is
        symmetrised (``(F + Fᵀ)/2``) before `jnp.linalg.eigh` (the official code takes the real
        part of a general ``torch.eig``, the same for a symmetric F).
      eps, power, eps_inside: see `directpred_eigenvalues` (``dyn_eps``, ``1/dyn_convert``,
        ``dyn_eps_inside``).

    Returns:
      The symmetric positive-definite predictor weight (fp32, symmetrised exactly):
      ``p(f) = W_p f``.

    Example:
      >>> f = jax.random.normal(jax.random.key(0), (64, 8))
      >>> wp = directpred_predictor(f.T @ f / 64)
      >>> wp.shape, bool(jnp.allclose(wp, wp.T))
      ((8, 8), True)
    """
    _check_square("directpred_predictor: corr", corr)
    c = corr.astype(jnp.float32)
    s, u = jnp.linalg.eigh(0.5 * (c + c.T))
    p = directpred_eigenvalues(s, eps, power, eps_inside)
    w = (u * p[None, :]) @ u.T
    return 0.5 * (w + w.T)  # exactly symmetric (the fp32 product is only up to rounding)


def ema_correlation(
    corr: Float[Array, "D D"], f: Float[Array, "N D"], rho: float, first: Array | bool = False
) -> Float[Array, "D D"]:
    """One update of DirectPred's correlation EMA: ``ρ F + (1 − ρ) mean_n f_n f_nᵀ`` (fp32).

    ``first`` (a bool or a traced bool): the official ``Accumulator`` stores the first batch's
    correlation as it is (no blending with the zero initial value).
    """
    f = f.astype(jnp.float32)
    batch = f.T @ f / f.shape[0]
    return jnp.where(first, batch, rho * corr + (1.0 - rho) * batch)


def _torch_linear_init(key: jax.Array, d: int) -> jax.Array:
    # nn.Linear's default weight init, U(-1/√d, 1/√d): the official predictor before its first
    # closed-form update.
    bound = 1.0 / jnp.sqrt(jnp.float32(d))
    return jax.random.uniform(key, (d, d), jnp.float32, -bound, bound)


class DirectPredictor(nn.Module):
    """DirectPred's closed-form linear predictor (Tian et al., https://arxiv.org/abs/2102.06810).

    Unlike BYOL's learned predictor it has no parameters: it keeps, in the non-parameter
    collection ``"directpred"``, the EMA correlation ``F`` of its inputs, the current weight
    ``W_p`` and a step counter. Called with ``update=True`` on a mutable collection (the
    trainer's training step), it predicts ``W_p f`` with the stored weight, then folds the
    batch into F (`ema_correlation`) and, every ``freq`` calls, sets ``W_p`` from F
    (`directpred_predictor`, under `jax.lax.cond`). The order is the official one: the
    prediction of step t uses the weight set after step t − 1 (``regulate_predictor`` runs after
    the optimizer step); before the first update ``W_p`` is `nn.Linear`'s random init.

    Deviation: with ``freq > 1`` the official predictor is also trained by SGD between the
    closed-form resets; here W_p is held fixed between them (it is state, not a parameter).
    Gradients do not reach F or W_p; they flow through ``f`` into the network below.

    Attributes:
      rho: EMA decay of F (``dyn_lambda``, 0.3).
      eps: added to the normalised square-rooted eigenvalues (``dyn_eps``, 0.01).
      freq: W_p is recomputed on calls whose step counter is a multiple of ``freq``
        (``predictor_freq``, 1).
      power: ``1 / dyn_convert`` (0.5).
      eps_inside: the official ``dyn_eps_inside`` (False).
      dtype: compute dtype of the prediction (F and W_p are fp32).

    Example:
      >>> m = DirectPredictor()
      >>> f = jax.random.normal(jax.random.key(0), (16, 8))
      >>> v = m.init(jax.random.key(1), f)
      >>> p, v2 = m.apply(v, f, update=True, mutable=["directpred"])
      >>> int(v2["directpred"]["step"]), p.shape
      (1, (16, 8))
    """

    rho: float = 0.3
    eps: float = 0.01
    freq: int = 1
    power: float = 0.5
    eps_inside: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, f: Float[Array, "N D"], update: bool = False) -> Float[Array, "N D"]:
        if f.ndim != 2:
            raise ValueError(f"DirectPredictor: f must be [N, D] projections, got shape {f.shape}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"DirectPredictor: rho must be in [0, 1), got {self.rho}")
        if isinstance(self.freq, bool) or not isinstance(self.freq, int) or self.freq < 1:
            raise ValueError(f"DirectPredictor: freq must be a positive int, got {self.freq!r}")
        d = f.shape[-1]
        col = DIRECTPRED_COLLECTION
        corr = self.variable(col, "corr", jnp.zeros, (d, d), jnp.float32)
        key = self.make_rng("params") if self.is_initializing() else None
        wp = self.variable(col, "wp", lambda: _torch_linear_init(key, d))
        step = self.variable(col, "step", jnp.zeros, (), jnp.int32)
        if wp.value.shape != (d, d):
            raise ValueError(f"DirectPredictor: f has {d} features but the stored predictor is "
                             f"{wp.value.shape}")  # fmt: skip
        dtype = self.dtype or f.dtype
        out = f.astype(dtype) @ wp.value.T.astype(dtype)
        if update and self.is_mutable_collection(col) and not self.is_initializing():
            fd = jax.lax.stop_gradient(f)
            new_corr = ema_correlation(corr.value, fd, self.rho, step.value == 0)
            corr.value = new_corr
            wp.value = jax.lax.cond(
                step.value % self.freq == 0,
                lambda c, w: directpred_predictor(c, self.eps, self.power, self.eps_inside),
                lambda c, w: w,
                new_corr,
                wp.value,
            )
            step.value = step.value + 1
        return out
