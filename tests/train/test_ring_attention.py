"""Ring self-attention (shard_map + ppermute over `sequence`) equals dense attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.registry import create_model
from jaxblocks.train.ring_attention import dense_attention, ring_attention
from jaxblocks.train.sharding import make_mesh


@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_dense_forward_and_grads(causal):
    mesh = make_mesh({"data": 2, "sequence": 4})
    q, k, v = (
        jax.random.normal(kk, (2, 12, 2, 8)) for kk in jax.random.split(jax.random.key(0), 3)
    )

    def loss(f, q, k, v):
        return (f(q, k, v, causal=causal) * jnp.cos(jnp.arange(8.0))[None, None, None, :]).sum()

    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: ring_attention(q, k, v, causal=causal))(q, k, v)
        g = jax.jit(jax.grad(lambda *a: loss(ring_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    ref = dense_attention(q, k, v, causal)
    gr = jax.grad(lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for a, b in zip(g, gr, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)
    # And dense attention equals the textbook softmax formula.
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(8)
    if causal:
        s = np.where(np.tril(np.ones((12, 12), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref, np.einsum("bhqs,bshv->bqhv", p, v), atol=2e-6)


def test_ring_attention_bad_inputs():
    mesh = make_mesh({"data": 2, "sequence": 4})
    q = jnp.ones((2, 10, 2, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible by sequence=4"):
        ring_attention(q, q, q)
    with pytest.raises(ValueError, match="must be"):
        ring_attention(q[0], q[0], q[0])


def test_model_with_ring_attention_matches_dense_model():
    mesh = make_mesh({"data": 2, "sequence": 4})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    dense = create_model("char_lm_tiny", attention="dense")
    ring = create_model("char_lm_tiny", attention="ring")
    variables = dense.init(jax.random.key(0), tokens)
    with jax.set_mesh(mesh):
        out_ring = jax.jit(ring.apply)(variables, tokens)
    np.testing.assert_allclose(out_ring, dense.apply(variables, tokens), atol=2e-5)
