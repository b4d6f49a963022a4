"""The softmax Transformer LM: cached decoding equals the full forward under the training mask,
and Next Block Prediction generates a block per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.moving_digits import moving_digit_videos
from jaxblocks.layers.block_causal import next_block_inputs_targets
from jaxblocks.layers.transformer import apply_rope, init_kv_cache
from jaxblocks.models.transformer_lm import (
    TransformerLM,
    generate_blocks,
    generate_tokens,
    init_caches,
)

KW = dict(vocab_size=11, dim=32, depth=2, num_heads=2)


def _tokens(b, t, v=11, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, v, jnp.int32)


def test_rope_preserves_norm_and_relative_positions():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    y = apply_rope(x, jnp.arange(5))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = x[:, :1], x[:, 1:2]
    dots = [
        jnp.vdot(apply_rope(q, jnp.array([s])), apply_rope(k, jnp.array([s + 3]))) for s in (0, 7)
    ]
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4)  # depends on the offset only


def test_causal_cached_decoding_equals_full_forward():
    model = TransformerLM(**KW)
    toks = _tokens(2, 13)
    variables = model.init(jax.random.key(1), toks)
    full = model.apply(variables, toks)
    caches = init_caches(model, 2, 13)
    a, caches = model.apply(variables, toks[:, :6], caches, chunk_causal=True,
                            method=TransformerLM.decode)  # fmt: skip
    outs = [a]
    for i in range(6, 13):
        o, caches = model.apply(variables, toks[:, i : i + 1], caches, method=TransformerLM.decode)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-4, atol=2e-4)
    assert int(caches[0].length) == 13


@pytest.mark.parametrize("prefix_len", [0, 3])
def test_block_cached_decoding_equals_full_forward_under_the_block_mask(prefix_len):
    model = TransformerLM(**KW, attention="block", block_size=4, prefix_len=prefix_len)
    toks = _tokens(2, prefix_len + 12, seed=2)
    variables = model.init(jax.random.key(3), toks)
    full = model.apply(variables, toks)
    caches = init_caches(model, 2, toks.shape[1])
    outs = []
    if prefix_len:
        o, caches = model.apply(variables, toks[:, :prefix_len], caches,
                                method=TransformerLM.decode)  # fmt: skip
        outs.append(o)
    for s in range(prefix_len, toks.shape[1], 4):
        o, caches = model.apply(variables, toks[:, s : s + 4], caches, method=TransformerLM.decode)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-4, atol=2e-4)
    # and the block mask matters: the causal model gives other logits on the same weights
    causal = TransformerLM(**KW).apply(variables, toks)
    assert float(jnp.max(jnp.abs(causal - full))) > 1e-3


def _greedy_blocks_by_full_forward(model, variables, context, num_blocks):
    k, p = model.block_size, model.prefix_len
    seq = context
    for _ in range(num_blocks):
        logits = model.apply(variables, seq)
        nxt = jnp.argmax(logits[:, -k:], axis=-1).astype(seq.dtype)
        seq = jnp.concatenate([seq, nxt], axis=1)
    return seq[:, p + k :]


def test_generate_blocks_equals_recomputing_the_full_sequence():
    model = TransformerLM(**KW, attention="block", block_size=3, prefix_len=2)
    context = _tokens(2, 5, seed=4)
    variables = model.init(jax.random.key(5), _tokens(2, 11))
    got = jax.jit(lambda v, c: generate_blocks(model, v, c, 4))(variables, context)
    want = _greedy_blocks_by_full_forward(model, variables, context, 4)
    assert got.shape == (2, 12)
    np.testing.assert_array_equal(got, want)


def test_generate_tokens_equals_recomputing_the_full_sequence():
    model = TransformerLM(**KW)
    prompt = _tokens(2, 4, seed=6)
    variables = model.init(jax.random.key(7), prompt)
    got = jax.jit(lambda v, p: generate_tokens(model, v, p, 6))(variables, prompt)
    seq = prompt
    for _ in range(6):
        nxt = jnp.argmax(model.apply(variables, seq)[:, -1], axis=-1).astype(seq.dtype)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq[:, 4:])


def test_moving_digits_and_the_next_block_objective():
    v = moving_digit_videos(3, frames=4, size=8, seed=1)
    assert v.shape == (3, 256) and v.min() >= 0 and v.max() <= 3 and v.max() > 0
    frames = v.reshape(3, 4, 8, 8)
    assert np.all(frames.sum(axis=(2, 3)) == frames[:, :1].sum(axis=(2, 3)))  # same sprite
    x, y = next_block_inputs_targets(jnp.asarray(v), 64)
    np.testing.assert_array_equal(y[:, :64], v[:, 64:128])  # frame 0's tokens predict frame 1


def test_errors():
    model = TransformerLM(**KW, attention="block", block_size=4)
    variables = model.init(jax.random.key(0), _tokens(1, 8))
    with pytest.raises(ValueError, match=r"context must be \[B, prefix_len \+ block_size\]"):
        generate_blocks(model, variables, _tokens(1, 3), 2)
    with pytest.raises(ValueError, match="attention='block'"):
        generate_blocks(TransformerLM(**KW), variables, _tokens(1, 4), 2)
    with pytest.raises(ValueError, match="integer"):
        model.apply(variables, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerLM(**KW, attention="local").init(jax.random.key(0), _tokens(1, 4))
    with pytest.raises(ValueError, match="exceeds the cache"):
        model.apply(variables, _tokens(1, 9), init_caches(model, 1, 8),
                    method=TransformerLM.decode)  # fmt: skip
    with pytest.raises(ValueError, match="does not match"):
        model.apply(variables, _tokens(1, 2), [init_kv_cache(1, 8, 3, 16)] * 2,
                    method=TransformerLM.decode)  # fmt: skip
