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


def _bn_eval(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _conv3(x, k):  # "same" k=3 conv, [B, T, Cin] x [3, Cin, Cout]
    xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    return sum(xp[:, i : i + x.shape[1]] @ k[i] for i in range(3))


def _perturbed(v, seed=3):
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda a: (np.asarray(a) + rng.uniform(0.1, 0.5, a.shape)).astype(np.float32),
        v["batch_stats"],
    )
    params = jax.tree.map(
        lambda a: (np.asarray(a) + 0.1 * rng.standard_normal(a.shape)).astype(np.float32),
        v["params"],
    )
    return {"params": params, "batch_stats": stats}


def test_non_spiking_embedding_and_ffn_follow_the_official_order():
    # Tokenizer: [conv -> ReLU -> BN] x 4, then x + rpe_conv(x); ConvFFN: GELU after fc1, ReLU
    # after fc2 (lmu_rnn_conv1d)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 5)))
    emb = Conv1dEmbedding(features=6)
    v = _perturbed(emb.init(jax.random.key(1), x))
    p, s = v["params"], v["batch_stats"]
    h = x
    for i in range(4):
        h = _bn_eval(np.maximum(_conv3(h, p[f"proj_conv{i}"]["kernel"]), 0), p[f"proj_bn{i}"],
                     s[f"proj_bn{i}"])  # fmt: skip
    want = h + _conv3(h, p["rpe_conv"]["kernel"])
    np.testing.assert_allclose(emb.apply(v, x), want, rtol=1e-4, atol=1e-4)
    assert "rpe_bn" not in p

    from jaxblocks.blocks.lmuformer import ConvFFN

    ffn = ConvFFN(hidden_features=12)
    v = _perturbed(ffn.init(jax.random.key(2), want))
    p, s = v["params"], v["batch_stats"]
    h = want @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = np.asarray(jax.nn.gelu(_bn_eval(h, p["fc1_bn"], s["fc1_bn"]), approximate=False))
    h = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    want2 = np.maximum(_bn_eval(h, p["fc2_bn"], s["fc2_bn"]), 0)
    np.testing.assert_allclose(ffn.apply(v, want), want2, rtol=1e-4, atol=1e-4)


def test_membrane_shortcut_variant():
    from jaxblocks.blocks.lmuformer import ConvFFN

    x = jax.random.normal(jax.random.key(0), (2, 12, 8))
    emb = Conv1dEmbedding(features=8, spiking=True, membrane_shortcut=True)
    v = emb.init(jax.random.key(1), x)
    y, _ = emb.apply(v, 3.0 * x, train=True, mutable=["batch_stats"])
    # the residual stream carries the last conv's membrane potential, not spikes
    assert not set(np.unique(np.asarray(y))) <= {0.0, 1.0, 2.0}
    assert "proj_bn3" in v["params"] and "rpe_bn" not in v["params"]
    blk = LMUFormerBlock(theta=12.0, mlp_ratio=2.0, spiking=True, membrane_shortcut=True)
    vb = blk.init(jax.random.key(2), y)
    assert set(vb["params"]["mixer"]) >= {"prev_bn", "lmu", "proj_conv", "proj_bn"}
    # pre-activation FFN: BN -> LIF -> fc1 -> BN -> LIF -> fc2, BNs over C and the hidden width
    assert vb["params"]["ffn"]["fc1_bn"]["scale"].shape == (8,)
    assert vb["params"]["ffn"]["fc2_bn"]["scale"].shape == (16,)
    out = blk.apply(vb, y)
    assert out.shape == y.shape and np.all(np.isfinite(out))
    for cls in (Conv1dEmbedding, ConvFFN):
        kw = {"features": 8} if cls is Conv1dEmbedding else {"hidden_features": 8}
        with pytest.raises(ValueError, match="membrane_shortcut=True needs spiking=True"):
            cls(membrane_shortcut=True, **kw).init(jax.random.key(0), x)


def test_lmuformer_models_recurrent_equals_parallel_and_errors():
    from jaxblocks.registry import create_model

    x = jax.random.normal(jax.random.key(0), (2, 20, 10))
    model = create_model("lmuformer_gsc", dim=8, num_classes=4, theta=20.0)
    v = model.init(jax.random.key(1), x)
    yp = model.apply(v, x, train=False)
    assert yp.shape == (2, 4)
    yr = model.apply(v, x, train=False, mode="recurrent")
    np.testing.assert_allclose(yp, yr, rtol=1e-4, atol=1e-4)
    # logits are the mean of per-token logits: the head is a Dense applied at every step
    assert v["params"]["head"]["kernel"].shape == (8, 4)
    ms = create_model("spiking_lmuformer_ms_gsc", dim=8, num_classes=4, theta=20.0)
    vm = ms.init(jax.random.key(1), x)
    assert "head_bn" in vm["params"] and ms.apply(vm, x, train=False).shape == (2, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, T, F\]"):
        model.apply(v, x[0], train=False)
    with pytest.raises(ValueError, match="no frames"):
        model.apply(v, x[:, :0], train=False)
    with pytest.raises(ValueError, match="train=None and the 'batch_stats'"):
        model.apply(v, x)
