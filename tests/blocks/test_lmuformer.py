"""LMUFormer blocks: recurrent ≡ parallel, causality of the mixer, spiking variant, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.lmuformer import Conv1dEmbedding, LMUFormerBlock, LMUMixer


@pytest.mark.parametrize("spiking", [False, True])
def test_block_recurrent_equals_parallel_and_trains(spiking):
    x = jax.random.normal(jax.random.key(0), (2, 24, 8))
    blk = LMUFormerBlock(theta=24.0, mlp_ratio=2.0, spiking=spiking)
    v = jax.jit(blk.init)(jax.random.key(1), x)
    yp = blk.apply(v, x)
    yr = blk.apply(v, x, mode="recurrent")
    assert yp.shape == x.shape
    if spiking:
        assert np.mean(np.isclose(yp, yr, atol=1e-4)) > 0.99  # threshold ties may flip a spike
    else:
        np.testing.assert_allclose(yp, yr, rtol=1e-4, atol=1e-4)

    def loss(p):
        y, _ = blk.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    g = jax.jit(jax.grad(loss))(v["params"])
    leaves = [np.asarray(a) for a in jax.tree.leaves(g)]
    assert all(np.isfinite(a).all() for a in leaves)
    # surrogate gradients reach the LMU's input projection even through the spikes
    assert np.abs(np.asarray(g["mixer"]["lmu"]["W_u"]["kernel"])).sum() > 0


def test_mixer_is_causal():
    x = jax.random.normal(jax.random.key(0), (2, 30, 6))
    mixer = LMUMixer(theta=30.0)
    v = jax.jit(mixer.init)(jax.random.key(1), x)
    y = mixer.apply(v, x)
    y2 = mixer.apply(v, x.at[:, 18:].add(2.0))
    np.testing.assert_allclose(y[:, :18], y2[:, :18], atol=1e-5)
    assert not np.allclose(y[:, 18:], y2[:, 18:])


def test_embedding_spiking_outputs_and_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 16, 5))
    emb = Conv1dEmbedding(features=8, spiking=True)
    v = jax.jit(emb.init)(jax.random.key(1), x)
    y = emb.apply(v, x)
    assert y.shape == (2, 16, 8)
    assert set(np.unique(np.asarray(y))) <= {0.0, 1.0, 2.0}  # spikes + spikes
    blk = LMUFormerBlock(theta=16.0, dtype=jnp.bfloat16)
    vb = jax.jit(blk.init)(jax.random.key(2), y)
    assert blk.apply(vb, y).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        blk.apply(vb, y[0])
