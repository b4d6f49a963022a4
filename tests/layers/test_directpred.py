"""DirectPred's closed-form predictor (`jaxblocks.layers.directpred`): the W_p construction
against NumPy's ``eigh``, its symmetry and definiteness, the correlation EMA, the ``freq``
schedule of `DirectPredictor`, and the official ``compute_w_corr`` rebuilt in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.directpred import (
    DIRECTPRED_COLLECTION,
    DirectPredictor,
    directpred_eigenvalues,
    directpred_predictor,
    ema_correlation,
)


def _corr(seed: int, d: int = 6, n: int = 40, shift: float = 0.0) -> np.ndarray:
    f = np.asarray(jax.random.normal(jax.random.key(seed), (n, d)), np.float64)
    return f.T @ f / n - shift * np.eye(d)


def _numpy_wp(corr: np.ndarray, eps: float = 0.01) -> np.ndarray:
    # The paper's Eqn. 18: p_j = sqrt(s_j^+ / max s) + eps, W_p = U diag(p) U^T.
    s, u = np.linalg.eigh(corr)
    p = np.maximum(np.sqrt(np.maximum(s, 0.0) / s.max()) + eps, 1e-4)
    return (u * p) @ u.T


@pytest.mark.parametrize("shift", [0.0, 0.5])  # 0.5: some eigenvalues negative (clamped to 0)
def test_predictor_matches_numpy_eigh_construction(shift):
    corr = _corr(0, shift=shift)
    if shift:
        assert np.linalg.eigvalsh(corr).min() < 0
    wp = np.asarray(directpred_predictor(jnp.asarray(corr, jnp.float32)))
    np.testing.assert_allclose(wp, _numpy_wp(corr), atol=2e-5)


def test_predictor_is_symmetric_positive_definite_with_top_eigenvalue_one_plus_eps():
    corr = _corr(1, d=7)
    for eps in (0.01, 0.1):
        wp = np.asarray(directpred_predictor(jnp.asarray(corr, jnp.float32), eps=eps), np.float64)
        np.testing.assert_array_equal(wp, wp.T)
        ev = np.linalg.eigvalsh(wp)
        assert ev.min() >= eps - 1e-5
        np.testing.assert_allclose(ev.max(), 1.0 + eps, atol=1e-5)
        # W_p shares F's eigenvectors: they commute.
        np.testing.assert_allclose(wp @ corr, corr @ wp, atol=1e-5)


def test_eigenvalue_variants_and_zero_correlation():
    s = jnp.array([4.0, 1.0, 0.0, -1.0])
    np.testing.assert_allclose(directpred_eigenvalues(s), [1.01, 0.51, 0.01, 0.01], atol=1e-6)
    np.testing.assert_allclose(
        directpred_eigenvalues(s, eps=0.01, eps_inside=True),
        np.sqrt([1.01, 0.26, 0.01, 0.01]), atol=1e-6,
    )  # fmt: skip
    # A negative eps is allowed in the official code; the clamp keeps p >= 1e-4.
    assert float(directpred_eigenvalues(s, eps=-0.5).min()) == pytest.approx(1e-4)
    wp = directpred_predictor(jnp.zeros((3, 3)))  # F = 0 before any data: p = eps, finite
    np.testing.assert_allclose(np.asarray(wp), 0.01 * np.eye(3), atol=1e-7)


def test_ema_correlation_formula():
    k1, k2 = jax.random.split(jax.random.key(2))
    f1, f2 = jax.random.normal(k1, (10, 4)), jax.random.normal(k2, (12, 4))
    c1, c2 = np.asarray(f1.T @ f1 / 10), np.asarray(f2.T @ f2 / 12)
    first = ema_correlation(jnp.zeros((4, 4)), f1, 0.3, first=True)
    np.testing.assert_allclose(first, c1, rtol=1e-5)  # the official Accumulator stores batch 1
    second = ema_correlation(first, f2, 0.3)
    np.testing.assert_allclose(second, 0.3 * c1 + 0.7 * c2, rtol=1e-5)


def test_directpredictor_updates_f_every_call_and_wp_every_freq_calls():
    d, freq, rho = 5, 3, 0.3
    m = DirectPredictor(rho=rho, freq=freq)
    keys = jax.random.split(jax.random.key(3), 8)
    fs = [jax.random.normal(k, (16, d)) for k in keys]
    v = m.init(jax.random.key(4), fs[0])
    st = v[DIRECTPRED_COLLECTION]
    assert st["corr"].shape == (d, d) and int(st["step"]) == 0
    step = jax.jit(lambda v, f: m.apply(v, f, update=True, mutable=[DIRECTPRED_COLLECTION]))
    corr = np.zeros((d, d))
    for t, f in enumerate(fs[:7]):
        out, new = step(v, f)
        # The prediction uses the weight stored before this call (the official order).
        np.testing.assert_allclose(out, f @ v[DIRECTPRED_COLLECTION]["wp"].T, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        c = np.asarray(f.T @ f / 16)
        corr = c if t == 0 else rho * corr + (1 - rho) * c
        ns = new[DIRECTPRED_COLLECTION]
        np.testing.assert_allclose(ns["corr"], corr, rtol=1e-5, atol=1e-6)
        assert int(ns["step"]) == t + 1
        if t % freq == 0:
            np.testing.assert_allclose(ns["wp"], directpred_predictor(ns["corr"]), atol=1e-6)
        else:
            np.testing.assert_array_equal(ns["wp"], v[DIRECTPRED_COLLECTION]["wp"])
        v = new
    # Evaluation (update=False) and immutable state: nothing moves.
    out, new = m.apply(v, fs[7], mutable=[DIRECTPRED_COLLECTION])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new, v))


def test_gradient_flows_only_through_the_prediction():
    m = DirectPredictor()
    f = jax.random.normal(jax.random.key(5), (8, 4))
    v = m.init(jax.random.key(6), f)

    def loss(v, f):
        out, _ = m.apply(v, f, update=True, mutable=[DIRECTPRED_COLLECTION])
        return jnp.sum(out**2)

    gv, gf = jax.grad(loss, argnums=(0, 1), allow_int=True)(v, f)
    # F only feeds the next steps' W_p (through eigh): the loss has no gradient into it.
    assert float(jnp.abs(gv[DIRECTPRED_COLLECTION]["corr"]).max()) == 0
    wp = v[DIRECTPRED_COLLECTION]["wp"]
    np.testing.assert_allclose(gf, 2 * (f @ wp.T) @ wp, rtol=1e-5)  # through W_p f only


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"corr: expected a square \[D, D\] matrix, got shape"):
        directpred_predictor(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="expected a floating matrix, got dtype int32"):
        directpred_predictor(jnp.ones((3, 3), jnp.int32))
    f = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"f must be \[N, D\] projections, got shape \(4, 3, 1\)"):
        DirectPredictor().init(jax.random.key(0), f[..., None])
    with pytest.raises(ValueError, match="freq must be a positive int, got 0"):
        DirectPredictor(freq=0).init(jax.random.key(0), f)
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\), got 1.0"):
        DirectPredictor(rho=1.0).init(jax.random.key(0), f)
    v = DirectPredictor().init(jax.random.key(0), f)
    with pytest.raises(ValueError, match=r"f has 5 features but the stored predictor is \(3, 3\)"):
        DirectPredictor().apply(v, jnp.ones((4, 5)))


@pytest.mark.torch
def test_matches_official_compute_w_corr_rebuilt_in_torch():
    torch = pytest.importorskip("torch")

    def official_w_corr(m, dyn_eps=0.01, dyn_convert=2):
        # `BYOLTrainer.compute_w_corr` with corr_eigen_decomp=True, balance_type="boost_scale",
        # dyn_eps_inside=False, dyn_reg=None (torch.eig is gone: eigh on the symmetric F).
        d, q = torch.linalg.eigh(m)
        e = d.clamp(0) / d.max()
        e = (e.pow(1 / dyn_convert) + dyn_eps).clamp(1e-4)
        return q @ torch.diag(e) @ q.t()

    # The official Accumulator (dyn_lambda=0.3) fed with the concatenated views' f f^T means.
    keys = jax.random.split(jax.random.key(7), 4)
    m, corr_t = DirectPredictor(), None
    fs = [jax.random.normal(k, (12, 6)) for k in keys]
    v = m.init(jax.random.key(8), fs[0])
    for f in fs:
        _, v = m.apply(v, f, update=True, mutable=[DIRECTPRED_COLLECTION])
        ft = torch.tensor(np.asarray(f), dtype=torch.float64)
        d = torch.bmm(ft.unsqueeze(2), ft.unsqueeze(1)).mean(0)
        corr_t = d if corr_t is None else 0.3 * corr_t + 0.7 * d
    st = v[DIRECTPRED_COLLECTION]
    np.testing.assert_allclose(st["corr"], corr_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["wp"], official_w_corr(corr_t).numpy(), atol=2e-5)
