"""Block Transformer: locality of the token decoder, cached decoding equals the full forward,
greedy generation equals recomputation, the official sizes, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.block_transformer import (
    BlockTransformer,
    BlockTransformerConfig,
    generate,
    init_block_caches,
    init_token_caches,
    official_num_heads,
)
from jaxblocks.registry import create_model, example_input, model_info

V, L = 37, 4
KW = dict(vocab_size=V, block_len=L, embed_dim=8, block_depth=2, block_heads=2, token_dim=24,
          token_depth=2, token_heads=2, expansion_ratio=2)  # fmt: skip
TOL = dict(rtol=2e-4, atol=2e-4)


def _tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V, jnp.int32)


@functools.cache
def _model():
    model = BlockTransformer(**KW)
    return model, model.init(jax.random.key(1), _tokens(2, 4 * L))


@functools.cache
def _forward():
    """The jitted full forward of `_model` (the tests call it on a few shapes only)."""
    model, _ = _model()
    return jax.jit(model.apply)


def _changed(a, b):
    """Per position: does any logit differ (by more than float noise)?"""
    return np.asarray(jnp.max(jnp.abs(a - b), axis=-1) > 1e-5)  # [B, T]


def test_forward_shapes_and_the_first_block_is_scored():
    model, variables = _model()
    toks = _tokens(3, 5 * L)
    logits = _forward()(variables, toks)
    assert logits.shape == (3, 5 * L, V) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    ctx = model.apply(variables, toks, method=BlockTransformer.block_contexts)
    assert ctx.shape == (3, 6, model.block_dim)  # start vector + 5 blocks
    # the start vector gives block 0 a context: its tokens get real predictions
    assert float(jnp.std(logits[:, : L - 1])) > 1e-3


def test_locality_earlier_blocks_never_see_a_change_later_ones_do():
    _, variables = _model()
    toks = _tokens(2, 5 * L, seed=1)
    j, q = 2, 1  # change the token at offset q of block j
    pos = j * L + q
    other = toks.at[:, pos].set((toks[:, pos] + 5) % V)
    changed = _changed(_forward()(variables, toks), _forward()(variables, other))
    # logits[t] scores token t + 1: nothing before the changed token may move
    assert not changed[:, :pos].any()
    # the rest of block j (same window) and every later block do
    assert changed[:, pos:].all()


def test_locality_later_blocks_see_block_j_only_through_the_block_decoder():
    model, variables = _model()
    toks = _tokens(2, 5 * L, seed=2)
    j = 2
    other = toks.at[:, j * L : (j + 1) * L].set((toks[:, j * L : (j + 1) * L] + 3) % V)
    ctx = model.apply(variables, toks, method=BlockTransformer.block_contexts)
    logits = functools.partial(model.apply, variables, method=BlockTransformer.token_logits)
    # with the block contexts held fixed, a change inside block j moves only block j's own
    # window: logits at positions jL .. jL+L-2 (they score tokens jL+1 .. jL+L-1)
    changed = _changed(logits(toks, ctx), logits(other, ctx))
    want = np.zeros(5 * L, bool)
    want[j * L : j * L + L - 1] = True
    np.testing.assert_array_equal(changed, np.broadcast_to(want, changed.shape))
    # and the context of block j + 1 moves exactly window j + 1 (positions jL+L-1 .. jL+2L-2)
    ctx2 = ctx.at[:, j + 1].add(1.0)
    changed = _changed(logits(toks, ctx), logits(toks, ctx2))
    want = np.zeros(5 * L, bool)
    want[j * L + L - 1 : (j + 1) * L + L - 1] = True
    np.testing.assert_array_equal(changed, np.broadcast_to(want, changed.shape))


def test_cached_decoding_equals_the_full_forward_teacher_forced():
    model, variables = _model()
    toks = _tokens(2, 4 * L, seed=3)
    full = _forward()(variables, toks)  # [B, T, V]
    apply = functools.partial(model.apply, variables)
    m = 2  # prompt blocks
    caches = init_block_caches(model, 2, 1 + 4)
    ctx, caches = apply(toks[:, : m * L], caches, start=True, method=BlockTransformer.decode_blocks)
    assert int(caches[0].length) == 1 + m
    for b in range(m, 4):
        tc = init_token_caches(model, 2)
        got, tc = apply(ctx, tc, method=BlockTransformer.decode_prefix)
        np.testing.assert_allclose(got, full[:, b * L - 1], **TOL)
        for p in range(L - 1):
            got, tc = apply(toks[:, b * L + p], tc, method=BlockTransformer.decode_token)
            np.testing.assert_allclose(got, full[:, b * L + p], **TOL)
        assert int(tc[0].length) == tc[0].max_len == model.expansion_ratio + L - 1
        block = toks[:, b * L : (b + 1) * L]
        ctx, caches = apply(block, caches, method=BlockTransformer.decode_blocks)
    full_ctx = apply(toks, method=BlockTransformer.block_contexts)
    np.testing.assert_allclose(ctx, full_ctx[:, -1], **TOL)
    assert int(caches[0].length) == 5  # one entry per block, plus the start vector


def _greedy_by_recomputation(variables, prompt, n_tokens):
    seq = prompt
    for _ in range(n_tokens):
        t = seq.shape[1]
        pad = jnp.zeros((seq.shape[0], (-t) % L), seq.dtype)  # filler after t: hidden causally
        logits = _forward()(variables, jnp.concatenate([seq, pad], axis=1))[:, t - 1]
        seq = jnp.concatenate([seq, jnp.argmax(logits, -1).astype(seq.dtype)[:, None]], axis=1)
    return seq[:, prompt.shape[1] :]


def test_generate_equals_greedy_recomputation_with_the_full_forward():
    model, variables = _model()
    prompt = _tokens(2, 2 * L, seed=4)
    got = jax.jit(lambda v, p: generate(model, v, p, 3))(variables, prompt)
    assert got.shape == (2, 3 * L) and got.dtype == prompt.dtype
    np.testing.assert_array_equal(got, _greedy_by_recomputation(variables, prompt, 3 * L))


def test_generate_from_the_start_vector_alone():
    model, variables = _model()
    empty = jnp.zeros((2, 0), jnp.int32)
    got = generate(model, variables, empty, 1)
    logits = model.apply(variables, got)  # position t scores t + 1: the first token is unscored
    ctx = model.apply(variables, got, method=BlockTransformer.block_contexts)
    first, _ = model.apply(variables, ctx[:, 0], init_token_caches(model, 2),
                           method=BlockTransformer.decode_prefix)  # fmt: skip
    np.testing.assert_array_equal(got[:, 0], jnp.argmax(first, -1))
    np.testing.assert_array_equal(got[:, 1:], jnp.argmax(logits[:, : L - 1], -1))


def test_official_sizes_and_the_parameter_count_difference():
    info = model_info("block_transformer_b4_5")
    assert info.published_params is None and "46,724,096" in info.params_source
    model = create_model("block_transformer_b4_5")
    assert (model.vocab_size, model.block_len, model.embed_dim, model.block_dim) == (
        50304, 4, 64, 256)  # fmt: skip
    assert (model.block_depth, model.token_depth, model.token_dim) == (3, 3, 256)
    assert model.block_heads == model.token_heads == official_num_heads(256) == 8
    assert official_num_heads(512) == 8 and official_num_heads(768) == 12
    shapes = jax.eval_shape(model.init, jax.random.key(0), example_input("block_transformer_b4_5"))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    # official total (conf/trainer/block_main_b4_5.yaml on the pythia-410m GPT-NeoX config),
    # less the block decoder's unused 50304 x 256 embed_in, less the attention biases GPT-NeoX
    # has and our blocks lack (4d per layer, 6 layers), plus our start vector (d)
    assert n == 46_724_096 - 50304 * 256 - 6 * 4 * 256 + 256


def test_errors():
    model, variables = _model()
    with pytest.raises(ValueError, match=r"tokens must be integer \[B, T\] with T a positive "
                       r"multiple of block_len=4, got int32\(2, 6\)"):  # fmt: skip
        model.apply(variables, _tokens(2, 6))
    with pytest.raises(ValueError, match="tokens must be integer"):
        model.apply(variables, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"prompt must be \[B, P\] with P a multiple"):
        generate(model, variables, _tokens(2, 5), 2)
    with pytest.raises(ValueError, match="num_blocks must be an int >= 1"):
        generate(model, variables, _tokens(2, 4), 0)
    with pytest.raises(ValueError, match="prompt must be integer"):
        generate(model, variables, jnp.ones((2, 4)), 1)
    with pytest.raises(ValueError, match=r"ctx must be \[B, N \+ 1, D\]"):
        model.apply(variables, _tokens(2, 8), jnp.zeros((2, 2, 32)),
                    method=BlockTransformer.token_logits)  # fmt: skip
    with pytest.raises(ValueError, match="token_heads=5 heads of an even width"):
        BlockTransformerConfig(token_dim=24, token_heads=5)
    with pytest.raises(ValueError, match="sizes must be ints >= 1"):
        BlockTransformerConfig(block_len=0)
    with pytest.raises(ValueError, match="block_heads=3"):
        BlockTransformer(**{**KW, "block_heads": 3}).init(jax.random.key(0), _tokens(1, 4))
