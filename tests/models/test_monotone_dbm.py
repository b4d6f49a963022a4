"""MonotoneDBM model: shapes, observed pixels kept, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.monotone_dbm import MonotoneDBM, MonotoneDBMConfig, pack_observed

TINY = dict(pixel_levels=5, hidden=((8, 2), (16, 4)), max_iter=10)


def _digits_batch(n=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    image = jnp.round(jax.random.uniform(k1, (n, 8, 8, 1)) * 4) / 4  # on the 5-level grid
    mask = jax.random.bernoulli(k2, 0.4, (n, 8, 8, 1))
    return pack_observed(image, mask), image, mask


def test_outputs_and_observed_pixels_are_kept():
    x, image, mask = _digits_batch(n=3)
    model = MonotoneDBM(**TINY)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    apply = jax.jit(model.apply)
    completed, logits, pixel_logits = apply(variables, x)
    assert completed.shape == (3, 8, 8, 1) and logits.shape == (3, 10)
    assert pixel_logits.shape == (3, 8, 8, 5)
    # the official per-pixel temperature, τ = √10 at init, scales the pixel logits by 10
    np.testing.assert_allclose(variables["params"]["tau"], np.full((8, 8), np.sqrt(10)), 1e-6)
    np.testing.assert_allclose(np.where(mask, completed, 0), np.where(mask, image, 0), atol=1e-6)
    assert float(completed.min()) >= 0.0 and float(completed.max()) <= 1.0
    # Unobserved pixels: the expectation under softmax(pixel logits), not under the fixed point's
    # own pixel marginals, which lack τ² (~10× flatter than the distribution the loss trains).
    expected = jnp.einsum("bhwk,k->bhw", jax.nn.softmax(pixel_logits, -1), jnp.linspace(0, 1, 5))
    np.testing.assert_allclose(
        np.where(mask, 0, completed), np.where(mask, 0, expected[..., None]), atol=1e-5
    )
    # clftau starts at √10 (the pixels' τ init), not the official 1: the demo then learns the
    # class within its CPU budget (see MonotoneDBMConfig.clf_tau_init); logits scale as clftau².
    np.testing.assert_allclose(variables["params"]["clf_tau"], np.sqrt(10), rtol=1e-6)
    official = MonotoneDBM(**TINY, clf_tau_init=1.0).init(jax.random.key(1), x)["params"]
    np.testing.assert_allclose(official["clf_tau"], 1.0)
    params1 = {**variables["params"], "clf_tau": official["clf_tau"]}
    _, logits1, _ = apply({"params": params1}, x)
    np.testing.assert_allclose(logits, 10.0 * logits1, rtol=1e-4, atol=1e-6)


def test_bad_input_raises():
    model = MonotoneDBM(**TINY)
    with pytest.raises(ValueError, match="x must be"):
        model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="alpha"):
        MonotoneDBMConfig(alpha=0.0)
    with pytest.raises(ValueError, match="image_size"):
        MonotoneDBMConfig(image_size=6)
    with pytest.raises(ValueError, match="clf_tau_init"):
        MonotoneDBMConfig(clf_tau_init=0.0)


def test_the_class_sees_the_pixels_through_the_coarse_tier():
    # The official kernels matrix couples the pixels to the coarse tier (A_20); without it the
    # class logits of the default network varied across digits by ~1e-4 at init and training
    # stayed at chance. A black and a white image (all pixels observed), exact solve, tiny tiers.
    image = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
    x = pack_observed(image, jnp.ones((2, 8, 8, 1)))
    model = MonotoneDBM(**{**TINY, "tol": 1e-6, "max_iter": 200})
    variables = model.init(jax.random.key(1), x)
    assert MonotoneDBMConfig().structure.kernels[2] == (3, 3, 3, 0)
    assert variables["params"]["A_20"].shape == (3, 3, 5, 16)
    _, logits, _ = jax.jit(model.apply)(variables, x)
    spread = float(jnp.max(jnp.abs(logits[0] - logits[1])))
    # 0.0126 here; 0.00048 with the block removed (the earlier structure)
    assert spread > 4e-3, spread


@pytest.mark.slow  # ~30 s; tests/layers/test_monotone_dbm.py checks the implicit gradient
def test_class_gradient_reaches_the_hidden_kernels(monkeypatch):
    # The class CE's implicit gradient on every kernel (the hidden tiers' included) equals
    # autodiff unrolled through the damped iteration: no path of the class is cut.
    import jaxblocks.models.monotone_dbm as mdbm

    x, _, _ = _digits_batch(n=3, seed=2)
    labels = jnp.array([0, 3, 7])
    model = MonotoneDBM(**{**TINY, "tol": 1e-6, "max_iter": 200})
    params = model.init(jax.random.key(1), x)["params"]
    params = {k: v * 3.0 if k.startswith("A_") else v for k, v in params.items()}

    def ce(p):
        _, logits, _ = model.apply({"params": p}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    implicit = jax.jit(jax.grad(ce))(params)

    def unrolled(fn, p, z0, _config):
        return jax.lax.fori_loop(0, 600, lambda _, z: fn(p, z), z0)

    monkeypatch.setattr(mdbm, "fixed_point", unrolled)
    reference = jax.jit(jax.grad(ce))(params)
    for name in ("A_10", "A_11", "A_20", "A_21", "A_22", "A_32", "A_33"):
        a, b = np.asarray(implicit[name]), np.asarray(reference[name])
        assert np.linalg.norm(b) > 1e-6, name
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < 1e-3, (name, err)
