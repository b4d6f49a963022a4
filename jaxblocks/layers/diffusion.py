"""Gaussian diffusion as pure functions: noise schedules, the forward process, the conversions
between ε-, v- and x₀-prediction, DDPM and DDIM steps, classifier-free guidance, a
`jax.lax.scan` sampler and One More Step's bridging step.

References: Ho et al., "Denoising Diffusion Probabilistic Models" (https://arxiv.org/abs/2006.11239,
the linear schedule and the ancestral step); Song et al., "Denoising Diffusion Implicit Models"
(https://arxiv.org/abs/2010.02502, the η-step); Nichol & Dhariwal (https://arxiv.org/abs/2102.09672,
the cosine schedule); Salimans & Ho (https://arxiv.org/abs/2202.00512, v-prediction); Ho & Salimans
(https://arxiv.org/abs/2207.12598, classifier-free guidance); Lin et al., "Common Diffusion Noise
Schedules and Sample Steps are Flawed" (https://arxiv.org/abs/2305.08891, zero terminal SNR and
"trailing" timesteps); Hu et al., "One More Step" (https://arxiv.org/abs/2311.15744, CVPR 2024,
official code mhh0318/OneMoreStep).

Conventions (diffusers'): ``alphas_cumprod[t]`` = ᾱ_t for the training timesteps
``t = 0 .. T-1``; ``x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε``; ``v = √ᾱ_t·ε − √(1-ᾱ_t)·x₀``. Schedules are
numpy float64 constants (they are built once, outside any trace); the array functions take ᾱ as a
scalar or one value per batch row ``[B]`` and compute in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "SPACINGS",
    "alphas_cumprod",
    "beta_schedule",
    "cfg_combine",
    "ddim_step",
    "ddpm_step",
    "eps_from_v",
    "eps_from_x0",
    "inference_timesteps",
    "make_alphas_cumprod",
    "oms_step",
    "prediction_target",
    "q_sample",
    "rescale_zero_terminal_snr",
    "sample",
    "split_prediction",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v", "sample")
SPACINGS = ("trailing", "leading", "linspace")


# --- schedules (numpy, float64) ----------------------------------------------------------------


def beta_schedule(
    kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """β_t for ``t = 0 .. T-1`` (float64).

    ``"linear"``: DDPM's ``linspace(beta_start, beta_end)``; ``"scaled_linear"``: Stable
    Diffusion's ``linspace(√beta_start, √beta_end)²`` (SD uses 0.00085, 0.012); ``"cosine"``:
    Nichol & Dhariwal's ``ᾱ(τ) = cos²((τ + 0.008)/1.008 · π/2)`` with β capped at 0.999
    (``beta_start``/``beta_end`` unused).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule: kind must be one of {BETA_SCHEDULES}, got {kind!r}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"beta_schedule: num_timesteps must be an int >= 2, got {num_timesteps!r}")
    if kind != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"beta_schedule: need 0 < beta_start <= beta_end < 1, got "
                         f"{beta_start!r}, {beta_end!r}")  # fmt: skip
    n = num_timesteps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2

    def abar(tau):
        return np.cos((tau + 0.008) / 1.008 * np.pi / 2) ** 2

    tau = np.arange(n + 1, dtype=np.float64) / n
    return np.minimum(1.0 - abar(tau[1:]) / abar(tau[:-1]), 0.999)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s)."""
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al., Algorithm 1: shift and scale √ᾱ so that √ᾱ_{T-1} = 0 (zero terminal SNR)
    while √ᾱ_0 keeps its value; returns the new betas (the last one is 1).

    ``√ᾱ ← (√ᾱ − √ᾱ_{T-1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T-1})``, then ``α_t = ᾱ_t / ᾱ_{t-1}``.
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"rescale_zero_terminal_snr: betas must be 1-D with >= 2 entries, got "
                         f"shape {betas.shape}")  # fmt: skip
    sqrt_ab = np.sqrt(alphas_cumprod(betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_alphas_cumprod(
    kind: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    zero_terminal_snr: bool = False,
) -> np.ndarray:
    """ᾱ_t of a `beta_schedule`, optionally rescaled to zero terminal SNR (float64, ``[T]``)."""
    betas = beta_schedule(kind, num_timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(betas)


def inference_timesteps(num_train: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """The descending training timesteps a sampler of ``num_steps`` visits (diffusers' spacings).

    ``"trailing"`` (Lin et al. §3.4): ``round(arange(T, 0, −T/n)) − 1``, so the first step is
    ``T − 1`` (the zero-SNR step when the schedule is rescaled); ``"leading"``:
    ``arange(n)·(T // n)`` reversed (SD's default, first step ``T − T/n``); ``"linspace"``:
    ``round(linspace(0, T − 1, n))`` reversed.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"inference_timesteps: spacing must be one of {SPACINGS}, got "
                         f"{spacing!r}")  # fmt: skip
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"inference_timesteps: num_steps must be in [1, {num_train}], got "
                         f"{num_steps!r}")  # fmt: skip
    if spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(num_steps) * (num_train // num_steps))[::-1].astype(np.int64)
    else:
        ts = np.round(np.linspace(0, num_train - 1, num_steps))[::-1].astype(np.int64)
    return np.ascontiguousarray(ts)


# --- the forward process and the parameterisations ---------------------------------------------


def _bc(a, x: Array) -> Array:
    """ᾱ given as a scalar or per batch row ``[B]``, as fp32 broadcastable against ``x``."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim == 0:
        return a
    if a.ndim != 1 or a.shape[0] != x.shape[0]:
        raise ValueError(f"alpha_bar must be a scalar or one value per batch row [{x.shape[0]}], "
                         f"got shape {a.shape}")  # fmt: skip
    return a.reshape(a.shape + (1,) * (x.ndim - 1))


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def q_sample(x0: Float[Array, "B ..."], noise: Float[Array, "B ..."], alpha_bar) -> Array:
    """x_t = √ᾱ·x₀ + √(1−ᾱ)·ε (fp32)."""
    if x0.shape != noise.shape:
        raise ValueError(f"q_sample: x0 {x0.shape} and noise {noise.shape} must match")
    a = _bc(alpha_bar, x0)
    return jnp.sqrt(a) * _f32(x0) + jnp.sqrt(1.0 - a) * _f32(noise)


def v_from_x0_eps(x0: Array, eps: Array, alpha_bar) -> Array:
    """v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho §4)."""
    a = _bc(alpha_bar, x0)
    return jnp.sqrt(a) * _f32(eps) - jnp.sqrt(1.0 - a) * _f32(x0)


def x0_from_v(x_t: Array, v: Array, alpha_bar) -> Array:
    """x₀ = √ᾱ·x_t − √(1−ᾱ)·v (defined at ᾱ = 0 too: x₀ = −v)."""
    a = _bc(alpha_bar, x_t)
    return jnp.sqrt(a) * _f32(x_t) - jnp.sqrt(1.0 - a) * _f32(v)


def eps_from_v(x_t: Array, v: Array, alpha_bar) -> Array:
    """ε = √(1−ᾱ)·x_t + √ᾱ·v."""
    a = _bc(alpha_bar, x_t)
    return jnp.sqrt(1.0 - a) * _f32(x_t) + jnp.sqrt(a) * _f32(v)


def x0_from_eps(x_t: Array, eps: Array, alpha_bar) -> Array:
    """x₀ = (x_t − √(1−ᾱ)·ε)/√ᾱ (undefined at zero SNR, ᾱ = 0: use v-prediction there)."""
    a = _bc(alpha_bar, x_t)
    return (_f32(x_t) - jnp.sqrt(1.0 - a) * _f32(eps)) / jnp.sqrt(a)


def eps_from_x0(x_t: Array, x0: Array, alpha_bar) -> Array:
    """ε = (x_t − √ᾱ·x₀)/√(1−ᾱ)."""
    a = _bc(alpha_bar, x_t)
    return (_f32(x_t) - jnp.sqrt(a) * _f32(x0)) / jnp.sqrt(1.0 - a)


def _check_prediction(fn: str, prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"{fn}: prediction must be one of {PREDICTIONS}, got {prediction!r}")


def prediction_target(x0: Array, eps: Array, alpha_bar, prediction: str = "v") -> Array:
    """What a network with ``prediction`` is trained to output: ε, v or x₀ (fp32)."""
    _check_prediction("prediction_target", prediction)
    if prediction == "epsilon":
        return _f32(eps)
    if prediction == "sample":
        return _f32(x0)
    return v_from_x0_eps(x0, eps, alpha_bar)


def split_prediction(
    model_output: Array, x_t: Array, alpha_bar, prediction: str = "v"
) -> tuple[Array, Array]:
    """(x̂₀, ε̂) from a network output of kind ``prediction`` at ``x_t`` (fp32)."""
    _check_prediction("split_prediction", prediction)
    if model_output.shape != x_t.shape:
        raise ValueError(f"split_prediction: model_output {model_output.shape} and x_t "
                         f"{x_t.shape} must match")  # fmt: skip
    if prediction == "v":
        return x0_from_v(x_t, model_output, alpha_bar), eps_from_v(x_t, model_output, alpha_bar)
    if prediction == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar), _f32(model_output)
    return _f32(model_output), eps_from_x0(x_t, model_output, alpha_bar)


# --- reverse steps ------------------------------------------------------------------------------


def ddim_step(
    model_output: Float[Array, "B ..."],
    x_t: Float[Array, "B ..."],
    alpha_bar_t,
    alpha_bar_prev,
    *,
    prediction: str = "v",
    eta: float = 0.0,
    noise: Array | None = None,
) -> Array:
    """DDIM (Song et al., Eq. 12): ``x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε̂ + σ·z`` with
    ``σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))``; η = 0 is deterministic, η = 1 is DDPM's
    ancestral step (`ddpm_step`). ``noise`` (z) is required when η > 0.
    """
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta!r}")
    x0, eps = split_prediction(model_output, x_t, alpha_bar_t, prediction)
    a_t, a_p = _bc(alpha_bar_t, x_t), _bc(alpha_bar_prev, x_t)
    ratio = (1.0 - a_t / a_p) / (1.0 - a_t)  # σ² / (1 − ᾱ_prev) at η = 1
    sigma = eta * jnp.sqrt(jnp.maximum((1.0 - a_p) * ratio, 0.0))
    # 1 − ᾱ_prev − σ² in a form that is exactly 0 at η = 1, ᾱ_t = 0 (no cancellation).
    rest = (1.0 - a_p) * jnp.maximum(1.0 - eta**2 * ratio, 0.0)
    out = jnp.sqrt(a_p) * x0 + jnp.sqrt(rest) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        out = out + sigma * _f32(noise)
    return out


def ddpm_step(
    model_output: Float[Array, "B ..."],
    x_t: Float[Array, "B ..."],
    alpha_bar_t,
    alpha_bar_prev,
    noise: Float[Array, "B ..."],
    *,
    prediction: str = "v",
) -> Array:
    """DDPM's ancestral step (Ho et al., Eqs. 6–7) from ``t`` to an earlier ``prev`` (strided
    steps use ``α = ᾱ_t/ᾱ_prev``, ``β = 1 − α``): the posterior ``q(x_prev | x_t, x̂₀)``,
    ``μ = √ᾱ_prev·β/(1−ᾱ_t)·x̂₀ + √α·(1−ᾱ_prev)/(1−ᾱ_t)·x_t``, variance
    ``β̃ = (1−ᾱ_prev)/(1−ᾱ_t)·β``, plus ``√β̃·noise``."""
    x0, _ = split_prediction(model_output, x_t, alpha_bar_t, prediction)
    a_t, a_p = _bc(alpha_bar_t, x_t), _bc(alpha_bar_prev, x_t)
    alpha = a_t / a_p
    beta = 1.0 - alpha
    mean = (jnp.sqrt(a_p) * beta / (1.0 - a_t)) * x0 + (
        jnp.sqrt(alpha) * (1.0 - a_p) / (1.0 - a_t)
    ) * _f32(x_t)
    var = (1.0 - a_p) / (1.0 - a_t) * beta
    return mean + jnp.sqrt(jnp.maximum(var, 0.0)) * _f32(noise)


def cfg_combine(uncond: Array, cond: Array, scale: float | Array) -> Array:
    """Classifier-free guidance (Ho & Salimans, Eq. 6 in diffusers' form):
    ``uncond + scale·(cond − uncond)``; scale 1 is the conditional output, 0 the unconditional."""
    if uncond.shape != cond.shape:
        raise ValueError(f"cfg_combine: uncond {uncond.shape} and cond {cond.shape} must match")
    return uncond + jnp.asarray(scale, uncond.dtype) * (cond - uncond)


def oms_step(
    model_output: Float[Array, "B ..."],
    x_T: Float[Array, "B ..."],
    alpha_prod_prev,
    rng: PRNGKeyArray | None = None,
    *,
    prediction: str = "v",
    eta: float = 1.0,
) -> Array:
    """One More Step (Hu et al., https://arxiv.org/abs/2311.15744): from pure noise ``x_T`` at
    the zero-SNR step (ᾱ_T = 0) to ``x_{T'}`` at the frozen model's first timestep (ᾱ_{T'} =
    ``alpha_prod_prev``), after which the frozen sampler continues unchanged.

    The OMS module's output at ᾱ_T = 0 gives ``x̂₀ = −v`` and ``ε̂ = x_T``, and the DDIM step
    becomes ``x_{T'} = √ᾱ_{T'}·x̂₀ + √(1−ᾱ_{T'}−σ²)·x_T + σ·z`` with ``σ = η·√(1−ᾱ_{T'})``.
    η = 1 (default) is the official ``OMSPipeline.oms_step``: the posterior mean
    ``√ᾱ_{T'}·x̂₀`` plus noise of variance ``(1−ᾱ_{T'})/(1−ᾱ_T)·β`` (β = 1 − ᾱ_T/ᾱ_{T'} = 1).
    Deviation: the official code multiplies the noise by that *variance* (its comment: "unit
    variance but seem dont need it"); here it is scaled by the standard deviation, which makes
    ``x_{T'}`` have the marginal variance the frozen model was trained on. η = 0 reuses ``x_T``
    as the noise (deterministic). ``rng`` is required for η > 0.
    """
    if eta < 0 or eta > 1:
        raise ValueError(f"oms_step: eta must be in [0, 1], got {eta!r}")
    x0, eps = split_prediction(model_output, x_T, 0.0, prediction)
    a_p = _bc(alpha_prod_prev, x_T)
    sigma = eta * jnp.sqrt(1.0 - a_p)
    out = jnp.sqrt(a_p) * x0 + jnp.sqrt((1.0 - a_p) * (1.0 - eta**2)) * eps
    if eta > 0:
        if rng is None:
            raise ValueError("oms_step: eta > 0 needs rng")
        out = out + sigma * jax.random.normal(rng, x_T.shape, jnp.float32)
    return out


# --- the sampling loop --------------------------------------------------------------------------


def sample(
    denoise: Callable[[Array, Array], Array],
    x_T: Float[Array, "B ..."],
    alphas_cumprod: np.ndarray | Array,
    timesteps: Int[Array, " S"] | np.ndarray,
    *,
    key: PRNGKeyArray | None = None,
    prediction: str = "v",
    eta: float = 0.0,
    sampler: str = "ddim",
    final_alpha_cumprod: float = 1.0,
) -> Array:
    """Run the reverse process from ``x_T`` over ``timesteps`` (descending) with `jax.lax.scan`.

    Each step calls ``denoise(x_t, t)`` (``t``: int32 ``[B]``, the training timestep; compose
    classifier-free guidance inside it with `cfg_combine`) and moves to the next timestep of the
    list, the last one to ᾱ = ``final_alpha_cumprod`` (diffusers' ``set_alpha_to_one``: the
    clean image). ``sampler="ddim"`` uses `ddim_step` with ``eta``; ``"ddpm"`` uses
    `ddpm_step`. ``key`` is needed when noise is drawn (ddpm, or ddim with η > 0).

    Returns:
      x₀ samples (fp32), the shape of ``x_T``.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sample: sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    _check_prediction("sample", prediction)
    ts = jnp.asarray(timesteps, jnp.int32)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"sample: timesteps must be a non-empty 1-D array, got shape {ts.shape}")
    ab = jnp.asarray(alphas_cumprod, jnp.float32)
    ab_t = ab[ts]
    ab_prev = jnp.concatenate([ab_t[1:], jnp.full((1,), final_alpha_cumprod, jnp.float32)])
    stochastic = sampler == "ddpm" or eta > 0
    if stochastic and key is None:
        raise ValueError(f"sample: sampler={sampler!r} with eta={eta} needs key")
    keys = jax.random.split(key, ts.shape[0]) if stochastic else jnp.zeros((ts.shape[0],))
    b = x_T.shape[0]

    def body(x, inp):
        t, a_t, a_p, k = inp
        out = denoise(x, jnp.full((b,), t, jnp.int32))
        z = jax.random.normal(k, x.shape, jnp.float32) if stochastic else None
        if sampler == "ddpm":
            x = ddpm_step(out, x, a_t, a_p, z, prediction=prediction)
        else:
            x = ddim_step(out, x, a_t, a_p, prediction=prediction, eta=eta, noise=z)
        return x, None

    x, _ = jax.lax.scan(body, _f32(x_T), (ts, ab_t, ab_prev, keys))
    return x
