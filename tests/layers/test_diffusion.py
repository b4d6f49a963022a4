"""Diffusion math (`jaxblocks.layers.diffusion`): schedules against their closed forms, the
parameterisations inverting each other, DDIM/DDPM steps, the sampler on a Gaussian data set with
its exact denoiser, One More Step's bridging step written out as the official code, CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import diffusion as D


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_beta_schedules_closed_forms():
    np.testing.assert_allclose(D.beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000))
    sl = D.beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    np.testing.assert_allclose(np.sqrt(sl), np.linspace(0.00085**0.5, 0.012**0.5, 1000))
    # Cosine: the betas telescope to ᾱ_t = f((t+1)/T) / f(0) wherever the 0.999 cap is inactive.
    T = 200
    ab = D.alphas_cumprod(D.beta_schedule("cosine", T))

    def f(tau):
        return np.cos((tau + 0.008) / 1.008 * np.pi / 2) ** 2

    want = f(np.arange(1, T + 1) / T) / f(0.0)
    np.testing.assert_allclose(ab[: T - 3], want[: T - 3], rtol=1e-10)
    assert D.beta_schedule("cosine", T).max() == 0.999


def test_zero_terminal_snr_is_lin_et_al_algorithm_1():
    betas = D.beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    old = np.sqrt(D.alphas_cumprod(betas))
    new_betas = D.rescale_zero_terminal_snr(betas)
    new = np.sqrt(D.alphas_cumprod(new_betas))
    assert new[-1] == 0.0 and new_betas[-1] == 1.0  # ᾱ_T = 0 exactly
    assert new[0] == pytest.approx(old[0], rel=1e-12)  # √ᾱ_1 kept
    # √ᾱ is shifted and scaled: an affine map of the old one fixing the first value.
    np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), atol=1e-12)
    ab = D.make_alphas_cumprod("linear", 50, zero_terminal_snr=True)
    assert ab[-1] == 0.0 and np.all(np.diff(ab) < 0)


def test_inference_timesteps():
    np.testing.assert_array_equal(D.inference_timesteps(1000, 10), np.arange(999, 0, -100))
    np.testing.assert_array_equal(D.inference_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
    np.testing.assert_array_equal(D.inference_timesteps(10, 3, "linspace"), [9, 4, 0])
    with pytest.raises(ValueError, match="spacing"):
        D.inference_timesteps(1000, 10, "middle")
    with pytest.raises(ValueError, match="num_steps"):
        D.inference_timesteps(10, 11)


def test_parameterisations_invert_each_other():
    x0, eps = _normal(0, (5, 4, 4, 2)), _normal(1, (5, 4, 4, 2))
    ab = jax.random.uniform(jax.random.key(2), (5,), minval=0.05, maxval=0.95)
    x_t = D.q_sample(x0, eps, ab)
    v = D.v_from_x0_eps(x0, eps, ab)
    close = dict(atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(D.x0_from_v(x_t, v, ab), x0, **close)
    np.testing.assert_allclose(D.eps_from_v(x_t, v, ab), eps, **close)
    np.testing.assert_allclose(D.x0_from_eps(x_t, eps, ab), x0, **close)
    np.testing.assert_allclose(D.eps_from_x0(x_t, x0, ab), eps, **close)
    for kind in D.PREDICTIONS:
        out = D.prediction_target(x0, eps, ab, kind)
        got_x0, got_eps = D.split_prediction(out, x_t, ab, kind)
        np.testing.assert_allclose(got_x0, x0, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got_eps, eps, atol=1e-4, rtol=1e-4)
    # At zero SNR x_t is the noise and v = −x₀.
    np.testing.assert_allclose(D.x0_from_v(eps, -x0, 0.0), x0)
    with pytest.raises(ValueError, match="alpha_bar"):
        D.q_sample(x0, eps, ab[:3])
    with pytest.raises(ValueError, match="prediction"):
        D.split_prediction(v, x_t, ab, "score")


def test_ddim_eta_one_is_the_ddpm_posterior():
    x_t, out, z = _normal(0, (3, 8)), _normal(1, (3, 8)), _normal(2, (3, 8))
    for a_t, a_p in ((0.3, 0.5), (0.0, 0.2), (0.9, 1.0)):
        for kind in ("v", "sample"):
            ddim = D.ddim_step(out, x_t, a_t, a_p, prediction=kind, eta=1.0, noise=z)
            ddpm = D.ddpm_step(out, x_t, a_t, a_p, z, prediction=kind)
            np.testing.assert_allclose(ddim, ddpm, atol=1e-5)
    # η = 0: x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂.
    x0, eps = D.split_prediction(out, x_t, 0.3)
    want = np.sqrt(0.5) * x0 + np.sqrt(0.5) * eps
    np.testing.assert_allclose(D.ddim_step(out, x_t, 0.3, 0.5), want, atol=1e-6)
    with pytest.raises(ValueError, match="eta > 0 needs noise"):
        D.ddim_step(out, x_t, 0.3, 0.5, eta=0.5)


def _gaussian_denoiser(acp, mu, s):
    """The exact v of data N(mu, s² I): E[x₀ | x_t] is linear in x_t."""
    acp = jnp.asarray(acp, jnp.float32)

    def denoise(x, t):
        ab = acp[t].reshape(-1, 1)
        x0 = mu + jnp.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab) * (x - jnp.sqrt(ab) * mu)
        eps = D.eps_from_x0(x, x0, acp[t])
        return D.v_from_x0_eps(x0, eps, acp[t])

    return denoise


def test_ddim_with_the_exact_denoiser_recovers_a_gaussian():
    mu, s = 0.7, 0.4
    acp = D.make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    ts = D.inference_timesteps(1000, 50)
    x_T = _normal(0, (4096, 8))
    x = D.sample(_gaussian_denoiser(acp, mu, s), x_T, acp, ts)

    # Closed form: every DDIM step maps x_t − √ᾱ_t·μ to c·(x_t − √ᾱ_t·μ) with
    # c = (√(ᾱ_prev ᾱ_t)·s² + √((1−ᾱ_prev)(1−ᾱ_t))) / (ᾱ_t s² + 1 − ᾱ_t); x_T ~ N(0, I) is
    # exactly the zero-SNR marginal, so the samples are N(μ, var) with var = 1·∏c².
    # Each step loses variance (Cauchy-Schwarz: c²σ_t² <= σ_prev²), less the more steps.
    def ddim_variance(steps):
        var, abs_ = 1.0, np.append(acp[D.inference_timesteps(1000, steps)], 1.0)
        for a, p in zip(abs_[:-1], abs_[1:], strict=True):
            c = (np.sqrt(p * a) * s**2 + np.sqrt((1 - p) * (1 - a))) / (a * s**2 + 1 - a)
            var *= c**2
        return var

    var = ddim_variance(50)
    assert 0.8 < var / s**2 < ddim_variance(200) / s**2 < ddim_variance(1000) / s**2 < 1
    assert ddim_variance(1000) / s**2 > 0.98  # the ODE's limit: N(μ, s²)
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - mu) < 4 * s / np.sqrt(x.size)
    assert abs(x.var() / var - 1) < 0.03
    # The DDPM ancestral sampler: x_prev − √ᾱ_prev·μ = c·d + √β̃·z with the posterior's
    # c = √ᾱ_prev·β/(1−ᾱ_t)·k + √α·(1−ᾱ_prev)/(1−ᾱ_t), k = √ᾱ_t·s²/(ᾱ_t s² + 1 − ᾱ_t).
    var_ddpm, abs_ = 1.0, np.append(acp[ts], 1.0)
    for a, p in zip(abs_[:-1], abs_[1:], strict=True):
        alpha = a / p
        k = np.sqrt(a) * s**2 / (a * s**2 + 1 - a)
        c = np.sqrt(p) * (1 - alpha) / (1 - a) * k + np.sqrt(alpha) * (1 - p) / (1 - a)
        var_ddpm = c**2 * var_ddpm + (1 - p) / (1 - a) * (1 - alpha)
    y = np.asarray(
        D.sample(_gaussian_denoiser(acp, mu, s), x_T, acp, ts, key=jax.random.key(1),
                 sampler="ddpm"), np.float64,
    )  # fmt: skip
    assert abs(y.mean() - mu) < 4 * s / np.sqrt(y.size)
    assert abs(y.var() / var_ddpm - 1) < 0.03


def test_oms_step_is_the_official_formula():
    # OMSPipeline.oms_step written out: alpha_prod_t = 0, x̂₀ = √ᾱ_t·x − √β_t·v, posterior
    # coefficients and variance (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), noise scaled by its square
    # root (the official code scales by the variance itself, see `oms_step`).
    v, x_T = _normal(0, (4, 8, 8, 1)), _normal(1, (4, 8, 8, 1))
    a_prev = 0.0047
    a_t = 0.0
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0 = a_t**0.5 * x_T - beta_prod_t**0.5 * v
    mean = (a_prev**0.5 * cur_beta / beta_prod_t) * x0 + (
        cur_alpha**0.5 * beta_prod_prev / beta_prod_t
    ) * x_T
    variance = (1 - a_prev) / (1 - a_t) * cur_beta
    key = jax.random.key(7)
    z = jax.random.normal(key, x_T.shape, jnp.float32)
    want = mean + variance**0.5 * z
    np.testing.assert_allclose(D.oms_step(v, x_T, a_prev, key), want, atol=1e-6)
    # η = 0: the DDIM step from ᾱ_T = 0 reuses x_T as ε̂.
    np.testing.assert_allclose(
        D.oms_step(v, x_T, a_prev, eta=0.0), a_prev**0.5 * -v + (1 - a_prev) ** 0.5 * x_T,
        atol=1e-6,
    )  # fmt: skip
    # It is the general DDIM step at ᾱ_t = 0.
    np.testing.assert_allclose(
        D.oms_step(v, x_T, a_prev, key), D.ddim_step(v, x_T, 0.0, a_prev, eta=1.0, noise=z),
        atol=1e-6,
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs rng"):
        D.oms_step(v, x_T, a_prev)
    with pytest.raises(ValueError, match="eta"):
        D.oms_step(v, x_T, a_prev, eta=1.5)


def test_cfg_combine():
    u, c = _normal(0, (2, 3)), _normal(1, (2, 3))
    np.testing.assert_allclose(D.cfg_combine(u, c, 1.0), c, atol=1e-6)
    np.testing.assert_allclose(D.cfg_combine(u, c, 0.0), u)
    np.testing.assert_allclose(D.cfg_combine(u, c, 3.0), u + 3.0 * (c - u), atol=1e-6)
    with pytest.raises(ValueError, match="uncond"):
        D.cfg_combine(u, c[:1], 2.0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="kind"):
        D.beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        D.beta_schedule("linear", 1)
    with pytest.raises(ValueError, match="beta_start"):
        D.beta_schedule("linear", 10, 0.1, 0.01)
    with pytest.raises(ValueError, match="betas"):
        D.rescale_zero_terminal_snr(np.ones((2, 2)))
    with pytest.raises(ValueError, match="sampler"):
        D.sample(lambda x, t: x, _normal(0, (2, 3)), np.ones(4) * 0.5, np.array([1]),
                 sampler="euler")  # fmt: skip
    with pytest.raises(ValueError, match="needs key"):
        D.sample(lambda x, t: x, _normal(0, (2, 3)), np.ones(4) * 0.5, np.array([1]), eta=1.0)
