"""L_orth (Achour et al. 2022) against the explicit circular-convolution operator, orthogonal
kernels by construction, optimisation with the penalty, errors, and the trainer option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.compress import conv_operator, lorth_penalty, orthogonality_error
from jaxblocks.train.regularizers import build_regularizer, lorth_kernels
from tests.train.helpers import run_steps, tiny_config


@pytest.mark.parametrize(
    ("k", "c", "m", "s"),
    [(3, 4, 4, 1), (3, 2, 6, 2), (2, 2, 8, 2), (4, 3, 5, 1), (3, 2, 16, 2), (1, 4, 2, 1)],
)
def test_lorth_equals_the_operator_gram_residual(k, c, m, s):
    """L_orth = ‖AAᵀ − I‖² (row case) or ‖AᵀA − I‖² (column case) per output position."""
    kernel = 0.3 * np.asarray(jax.random.normal(jax.random.key(k * 100 + m), (k, k, c, m)))
    size = s * -(-3 * k // s)  # large enough that no shift wraps onto another
    a = conv_operator(kernel, s, size)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    want = np.sum((gram - np.eye(len(gram))) ** 2) / (size // s) ** 2
    got = float(lorth_penalty(jnp.asarray(kernel), s))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got > 0.1


def test_orthogonal_by_construction_has_zero_penalty():
    q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (6, 6))))[0]
    centre = np.zeros((3, 3, 6, 4), np.float32)
    centre[1, 1] = q[:, :4]  # 4 orthonormal rows of a 1x1 map at the centre tap (row case)
    assert float(lorth_penalty(jnp.asarray(centre))) < 1e-9
    assert orthogonality_error(centre) < 1e-6
    # Stride 2, kernel 2: space-to-depth (M = S²C) is an orthogonal (invertible) downsampling.
    s2d = np.zeros((2, 2, 3, 12), np.float32)
    for i in range(2):
        for j in range(2):
            for ch in range(3):
                s2d[i, j, ch, (i * 2 + j) * 3 + ch] = 1.0
    assert abs(float(lorth_penalty(jnp.asarray(s2d), 2))) < 1e-9
    assert orthogonality_error(s2d, 2) < 1e-6
    rnd = np.asarray(jax.random.normal(jax.random.key(1), (3, 3, 6, 4))) * 0.3
    assert float(lorth_penalty(jnp.asarray(rnd))) > 0.1 and orthogonality_error(rnd) > 0.1


# (M = S²C, e.g. 4 -> 4 at stride 1, is hard to optimise, as deel-lip warns; avoided here.)
@pytest.mark.parametrize(("k", "c", "m", "s"), [(3, 4, 3, 1), (3, 2, 12, 2)])
def test_minimising_the_penalty_drives_the_orthogonality_error_down(k, c, m, s):
    kernel = 0.3 * jax.random.normal(jax.random.key(3), (k, k, c, m))
    before = orthogonality_error(np.asarray(kernel), s)
    opt = optax.adam(0.02)
    state = opt.init(kernel)
    grad = jax.jit(jax.grad(lambda w: lorth_penalty(w, s)))
    for _ in range(300):
        updates, state = opt.update(grad(kernel), state)
        kernel = optax.apply_updates(kernel, updates)
    after = orthogonality_error(np.asarray(kernel), s)
    assert after < 0.1 * before, (before, after)


def test_errors():
    with pytest.raises(ValueError, match=r"no row-orthogonal conv .* C_out=10 > k²·C_in=9"):
        lorth_penalty(jnp.ones((3, 3, 1, 10)), 4)
    with pytest.raises(ValueError, match="no column-orthogonal conv .* stride exceeds"):
        lorth_penalty(jnp.ones((1, 1, 2, 16)), 2)
    with pytest.raises(
        ValueError, match=r"kernel must be a square 2-D conv kernel .*\(3, 2, 1, 1\)"
    ):
        lorth_penalty(jnp.ones((3, 2, 1, 1)))
    for bad in (0, 1.0, True):
        with pytest.raises(ValueError, match="stride must be a positive int"):
            lorth_penalty(jnp.ones((3, 3, 2, 2)), bad)


def test_trainer_option_adds_the_penalty_and_names_bad_kernels():
    cfg = tiny_config("cnn_tiny", regularizers__lorth_weight=0.05)
    cfg.train_steps = 12
    losses, state = run_steps(cfg, 12)
    kernels = lorth_kernels(cfg, state.params)
    assert kernels == {"conv0/kernel": 1, "conv1/kernel": 1}
    reg = build_regularizer(cfg)
    penalty, metrics = reg(state.params)
    np.testing.assert_allclose(penalty, 0.05 * metrics["lorth"], rtol=1e-6)
    start, _ = reg(run_steps(tiny_config("cnn_tiny", regularizers__lorth_weight=0.05), 0)[1].params)
    assert float(penalty) < float(start)  # training lowered it
    assert build_regularizer(tiny_config("cnn_tiny")) is None
    with pytest.raises(ValueError, match="matches no square 4-D conv kernel"):
        lorth_kernels(tiny_config("mlp_tiny", regularizers__lorth_weight=1.0), {"w": jnp.ones(3)})
    bad = tiny_config("cnn_tiny", regularizers__lorth_weight=1.0,
                      regularizers__lorth_strides=((r"^down", 2),))  # fmt: skip
    params = {
        "down": {"kernel": jnp.ones((1, 1, 2, 16))},
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
    }
    with pytest.raises(
        ValueError, match=r"matches 'down/kernel'.*column-orthogonal.*lorth_strides"
    ):
        lorth_kernels(bad, params)
    assert lorth_kernels(bad, {"conv": params["conv"]}) == {"conv/kernel": 1}
