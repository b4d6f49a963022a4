"""BYOL with DirectPred's predictor (`jaxblocks.models.byol`): the loss against a manual
forward pass (symmetric, in [0, 4]), the target's EMA update, no gradient into the target, the
three predictors, the encoder features and bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.directpred import DIRECTPRED_COLLECTION
from jaxblocks.models.byol import (
    BYOL,
    PREDICTORS,
    TARGET_COLLECTION,
    augment_views,
    byol_loss,
    encode,
    target_tau,
)
from tests.kernels.harness import leaves_changed

KW = dict(encoder="mlp_tiny", encoder_kwargs={"hidden": (16,)}, feature_dim=8,
          projection_hidden=16, projection_dim=6)  # fmt: skip
MUTABLE = ["batch_stats", DIRECTPRED_COLLECTION, TARGET_COLLECTION]


def _images(seed: int = 0, b: int = 6) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (b, 8, 8, 1))


def _init(model, x):
    return nn.unbox(model.init(jax.random.key(1), x))


def test_augment_views_shift_and_noise():
    x = _images(5)
    v = augment_views(jax.random.key(0), x, max_shift=1, noise_std=0.0)
    # Each view is x translated by at most one pixel (zero fill): some shift matches exactly.
    pad = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(len(x)):
        crops = [pad[i, a : a + 8, b : b + 8] for a in range(3) for b in range(3)]
        assert any(np.array_equal(np.asarray(v[i]), c) for c in crops)
    n = augment_views(jax.random.key(0), x, max_shift=0, noise_std=0.2) - x
    assert 0.15 < float(jnp.std(n)) < 0.25
    np.testing.assert_array_equal(augment_views(jax.random.key(0), x, 0, 0.0), x)


def test_byol_loss_range_and_symmetry():
    k1, k2 = jax.random.split(jax.random.key(0))
    p, z = jax.random.normal(k1, (5, 7)), jax.random.normal(k2, (5, 7))
    loss = byol_loss(p, z)
    assert loss.shape == (5,) and bool(jnp.all((loss >= 0) & (loss <= 4)))
    np.testing.assert_allclose(loss, byol_loss(z, p), rtol=1e-6)
    np.testing.assert_allclose(byol_loss(p, 3.0 * p), 0.0, atol=1e-6)  # scale-invariant
    np.testing.assert_allclose(byol_loss(p, -p), 4.0, atol=1e-6)


def test_loss_matches_a_manual_forward_and_is_symmetric_in_the_views():
    model = BYOL(**KW)
    x = _images()
    v = _init(model, x)
    # Perturb the target so that online and target branches differ.
    leaves, tdef = jax.tree.flatten(v[TARGET_COLLECTION]["variables"]["params"])
    keys = jax.random.split(jax.random.key(9), len(leaves))
    noisy = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    v[TARGET_COLLECTION]["variables"]["params"] = jax.tree.unflatten(tdef, noisy)
    seen = []

    def spy(next_fun, args, kwargs, context):  # the views the online branch is called with
        if context.module.name == "online" and context.method_name == "__call__":
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        loss = model.apply(v, x, rngs={"augment": jax.random.key(3)})
    v1, v2 = seen
    assert v1.shape == x.shape and not np.allclose(v1, v2)
    assert float(jnp.abs(v1 - x).max()) > 0.1  # shifted and noisy
    branch = model._branch(parent=None)
    online = {"params": v["params"]["online"], "batch_stats": v["batch_stats"]["online"]}
    target = v[TARGET_COLLECTION]["variables"]
    wp = v[DIRECTPRED_COLLECTION]["predictor"]["wp"]
    z1, z2 = (branch.apply(online, a)[1] for a in (v1, v2))
    t1, t2 = (branch.apply(target, a)[1] for a in (v1, v2))
    p1, p2 = z1 @ wp.T, z2 @ wp.T
    want = 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    swapped = 0.5 * (byol_loss(p2, t1) + byol_loss(p1, t2))
    np.testing.assert_allclose(loss, swapped, rtol=1e-6)
    assert bool(jnp.all((loss >= 0) & (loss <= 4)))
    # Without an RNG the views come from a fixed key: evaluation is deterministic.
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))
    assert not np.allclose(model.apply(v, x), loss)


@pytest.mark.parametrize("schedule", [0, 10])
def test_target_is_an_ema_of_the_online_weights(schedule):
    tau = 0.9
    model = BYOL(**KW, tau=tau, tau_schedule_steps=schedule)
    x = _images(1)
    v = _init(model, x)
    old = jax.tree.map(lambda a: a + 0.5, v[TARGET_COLLECTION]["variables"]["params"])
    v[TARGET_COLLECTION]["variables"]["params"] = old
    v[TARGET_COLLECTION]["step"] = jnp.asarray(4, jnp.int32)
    _, new = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=MUTABLE)
    t = float(target_tau(jnp.asarray(4), tau, schedule))
    if schedule:
        assert t == pytest.approx(1 - (1 - tau) * (np.cos(np.pi * 0.4) + 1) / 2)
    want = jax.tree.map(lambda xi, th: t * xi + (1 - t) * th, old, v["params"]["online"])
    got = new[TARGET_COLLECTION]["variables"]["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    assert int(new[TARGET_COLLECTION]["step"]) == 5
    # The target's BatchNorm statistics move with its own forward passes (train mode).
    moved = leaves_changed(
        new[TARGET_COLLECTION]["variables"]["batch_stats"],
        v[TARGET_COLLECTION]["variables"]["batch_stats"],
    )
    assert all(jax.tree.leaves(moved))
    assert int(new[DIRECTPRED_COLLECTION]["predictor"]["step"]) == 1
    # The schedule rises from tau to 1.
    assert float(target_tau(jnp.asarray(0), tau, 10)) == pytest.approx(tau)
    assert float(target_tau(jnp.asarray(25), tau, 10)) == pytest.approx(1.0)


def test_gradients_do_not_flow_into_the_target_or_the_predictor_state():
    model = BYOL(**KW)
    x = _images(2)
    v = _init(model, x)
    params, rest = v["params"], {k: a for k, a in v.items() if k != "params"}

    def loss(params, rest):
        out, _ = model.apply({"params": params, **rest}, x, train=True,
                             rngs={"dropout": jax.random.key(4)}, mutable=MUTABLE)  # fmt: skip
        return out.mean()

    gp, gr = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, rest)
    for leaf in jax.tree.leaves(gr[TARGET_COLLECTION]["variables"]):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert float(jnp.abs(gr[DIRECTPRED_COLLECTION]["predictor"]["corr"]).max()) == 0.0
    g = jax.tree.leaves(gp)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in g)
    assert max(float(jnp.abs(a).max()) for a in g) > 0


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_each_predictor_trains_one_step(predictor):
    model = BYOL(**KW, predictor=predictor)
    x = _images(3)
    v = _init(model, x)
    assert ("predictor" in v["params"]) == (predictor != "directpred")
    assert (DIRECTPRED_COLLECTION in v) == (predictor == "directpred")
    loss, new = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(5)},
                            mutable=[c for c in v if c != "params"])  # fmt: skip
    assert loss.shape == (6,) and bool(jnp.all(jnp.isfinite(loss)))
    assert set(new) == {c for c in v if c != "params"}


def test_encode_returns_the_online_encoder_features():
    model = BYOL(**{**KW, "encoder": "cnn_tiny", "encoder_kwargs": {"channels": (4, 8)}})
    x = _images(4)
    v = _init(model, x)
    feats = encode(model, v, x)
    assert feats.shape == (6, 8)
    enc = model.encoder_module()
    direct = enc.apply({"params": v["params"]["online"]["encoder"],
                        "batch_stats": v["batch_stats"]["online"]["encoder"]}, x)  # fmt: skip
    np.testing.assert_allclose(feats, direct, rtol=1e-6)


def test_bad_inputs_raise():
    x = _images()
    with pytest.raises(ValueError, match=r"x must be floating images \[B, H, W, C\], got shape "
                                         r"\(6, 8, 8\)"):  # fmt: skip
        BYOL(**KW).init(jax.random.key(0), x[..., 0])
    with pytest.raises(ValueError, match="got shape .* and dtype int32"):
        BYOL(**KW).init(jax.random.key(0), x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"predictor must be one of \('directpred', 'linear', "):
        BYOL(**KW, predictor="nope").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\], got 1.5"):
        BYOL(**KW, tau=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="max_shift and noise_std must be >= 0"):
        BYOL(**KW, max_shift=-1).init(jax.random.key(0), x)
