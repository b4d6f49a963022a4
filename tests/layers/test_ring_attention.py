"""Ring self-attention (shard_map + ppermute over a sequence mesh axis) equals dense attention."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxblocks.layers.ring_attention import (
    DEFAULT_BATCH_AXES,
    DEFAULT_HEAD_AXIS,
    DEFAULT_SEQUENCE_AXIS,
    dense_attention,
    ring_attention,
)
from jaxblocks.registry import create_model
from jaxblocks.train import sharding
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


def test_default_axis_names_are_the_trainers():
    defaults = {name: p.default for name, p in inspect.signature(ring_attention).parameters.items()}
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    assert defaults["sequence_axis"] == DEFAULT_SEQUENCE_AXIS == rules["act_length"]
    assert tuple(defaults["batch_axes"]) == DEFAULT_BATCH_AXES == sharding.BATCH_AXES
    assert defaults["head_axis"] == DEFAULT_HEAD_AXIS == rules["heads"]
    axes = {defaults["sequence_axis"], defaults["head_axis"], *defaults["batch_axes"]}
    assert axes == set(sharding.MESH_AXES)
    lm = create_model("char_lm_tiny", attention="ring")
    assert (lm.sequence_axis, lm.batch_axes, lm.head_axis) == (
        defaults["sequence_axis"],
        tuple(defaults["batch_axes"]),
        defaults["head_axis"],
    )


def _custom_mesh():
    # Not the trainer's names: the layer must take them from its arguments.
    return jax.make_mesh((2, 4), ("dp", "seq"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("causal", [False, True])
def test_ring_on_a_mesh_with_other_axis_names(causal):
    q, k, v = (
        jax.random.normal(kk, (2, 12, 2, 8)) for kk in jax.random.split(jax.random.key(1), 3)
    )
    ring = lambda q, k, v: ring_attention(  # noqa: E731
        q, k, v, causal=causal, sequence_axis="seq", batch_axes=("dp",), head_axis=None
    )
    with jax.set_mesh(_custom_mesh()):
        jaxpr = str(jax.make_jaxpr(ring)(q, k, v))
        out = jax.jit(ring)(q, k, v)
        g = jax.jit(jax.grad(lambda *a: ring(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
        # With the default names nothing matches this mesh: plain dense attention, no ring.
        assert "ppermute" not in str(jax.make_jaxpr(ring_attention)(q, k, v))
    assert "ppermute" in jaxpr and "shard_map" in jaxpr  # the ring ran, not the dense fallback
    ref = dense_attention(q, k, v, causal)
    gr = jax.grad(lambda *a: dense_attention(*a, causal).sum(), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for a, b in zip(g, gr, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_model_passes_its_axis_names_to_the_ring():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
    dense = create_model("char_lm_tiny", attention="dense")
    ring = create_model(
        "char_lm_tiny", attention="ring", sequence_axis="seq", batch_axes=("dp",), head_axis=None
    )
    variables = dense.init(jax.random.key(0), tokens)
    with jax.set_mesh(_custom_mesh()):
        assert "ppermute" in str(jax.make_jaxpr(ring.apply)(variables, tokens))
        out_ring = jax.jit(ring.apply)(variables, tokens)
    np.testing.assert_allclose(out_ring, dense.apply(variables, tokens), atol=2e-5)


def test_ring_attention_bad_axis_names():
    q = jnp.ones((2, 8, 2, 4))
    with pytest.raises(TypeError, match="sequence_axis must be a mesh axis name"):
        ring_attention(q, q, q, sequence_axis=3)
    with pytest.raises(TypeError, match="batch_axes must be a sequence of mesh axis names"):
        ring_attention(q, q, q, batch_axes=("data", 1))
    with pytest.raises(TypeError, match="head_axis must be a mesh axis name"):
        ring_attention(q, q, q, head_axis=("tensor",))
    with pytest.raises(ValueError, match="distinct mesh axes"):
        ring_attention(q, q, q, sequence_axis="data")
