"""Block Transformer: locality of the token decoder, cached decoding equals the full forward,
greedy generation equals recomputation, the official sizes and exact parameter counts, the
GPT-NeoX layer against a torch rebuild of HF's, the partial rotary, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.block_transformer import GPTNeoXLayer, apply_partial_rope, rotary_dims
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
KW = dict(vocab_size=V, block_len=L, embed_dim=8, block_depth=2, block_heads=2, token_dim=32,
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
    assert ctx.shape == (3, 6, model.block_dim)  # start block + 5 blocks
    # the start block gives block 0 a context: its tokens get real predictions
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
    assert int(caches[0].length) == 5  # one entry per block, plus the start block


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


def test_generate_from_the_start_block_alone():
    model, variables = _model()
    empty = jnp.zeros((2, 0), jnp.int32)
    got = generate(model, variables, empty, 1)
    logits = model.apply(variables, got)  # position t scores t + 1: the first token is unscored
    ctx = model.apply(variables, got, method=BlockTransformer.block_contexts)
    first, _ = model.apply(variables, ctx[:, 0], init_token_caches(model, 2),
                           method=BlockTransformer.decode_prefix)  # fmt: skip
    np.testing.assert_array_equal(got[:, 0], jnp.argmax(first, -1))
    np.testing.assert_array_equal(got[:, 1:], jnp.argmax(logits[:, : L - 1], -1))


# official totals and non-embedding counts (the presets' names), from conf/trainer/
# block_main_b4_{5,19,85}.yaml over the pythia-410m GPT-NeoX config
OFFICIAL = {
    "block_transformer_b4_5": (46_724_096, 4_871_168),
    "block_transformer_b4_19": (103_147_520, 19_441_664),
    "block_transformer_b4_85": (211_797_504, 86_238_720),
}


def _param_counts(name):
    shapes = jax.eval_shape(create_model(name).init, jax.random.key(0), example_input(name))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    total = sum(int(np.prod(x.shape)) for _, x in flat)
    # the four token tables: embedder, block decoder's unused embed_in, token embed_in, embed_out
    tables = {"embedder", "block_embed_in", "token_embed", "head"}
    emb = sum(int(np.prod(x.shape)) for path, x in flat if str(path[0].key) in tables)
    return total, total - emb


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_parameter_counts_exactly(name):
    assert model_info(name).published_params == OFFICIAL[name][0]
    assert _param_counts(name) == OFFICIAL[name]


def test_official_sizes():
    model = create_model("block_transformer_b4_5")
    assert (model.vocab_size, model.block_len, model.embed_dim, model.block_dim) == (
        50304, 4, 64, 256)  # fmt: skip
    assert (model.block_depth, model.token_depth, model.token_dim) == (3, 3, 256)
    assert model.block_heads == model.token_heads == official_num_heads(256) == 8
    assert official_num_heads(512) == 8 and official_num_heads(768) == 12
    assert model.decoder_layer == "gpt_neox" and model.rotary_pct == 0.25
    d = 256  # per GPT-NeoX layer: 12 d^2 + 13 d (fused qkv and dense with biases, MLP, 2 LNs)
    shapes = jax.eval_shape(GPTNeoXLayer(8, 32).init, jax.random.key(0), jnp.ones((1, 2, d)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 12 * d * d + 13 * d


def test_pre_ln_variant_still_decodes_like_its_forward():
    model = BlockTransformer(**KW, decoder_layer="pre_ln", unused_embed_in=False)
    toks = _tokens(2, 2 * L, seed=5)
    variables = model.init(jax.random.key(2), toks)
    assert "block_embed_in" not in variables["params"]
    assert "attn" in variables["params"]["block_layers_0"]  # the project's TransformerBlock
    full = model.apply(variables, toks)
    caches = init_block_caches(model, 2, 3)
    ctx, _ = model.apply(variables, toks[:, :L], caches, start=True,
                         method=BlockTransformer.decode_blocks)  # fmt: skip
    got, _ = model.apply(variables, ctx, init_token_caches(model, 2),
                         method=BlockTransformer.decode_prefix)  # fmt: skip
    np.testing.assert_allclose(got, full[:, L - 1], **TOL)


def test_partial_rotary_against_numpy():
    B, T, H, D, rot, base = 2, 5, 3, 16, 4, 10000.0
    x = np.asarray(jax.random.normal(jax.random.key(7), (B, T, H, D)), np.float64)
    pos = np.arange(T) + 3
    want = x.copy()
    for i in range(rot // 2):  # pairs (i, i + rot/2) turn by pos * base^(-2i/rot)
        a = pos * base ** (-2 * i / rot)
        c, s_ = np.cos(a)[None, :, None], np.sin(a)[None, :, None]
        x1, x2 = x[..., i], x[..., i + rot // 2]
        want[..., i], want[..., i + rot // 2] = x1 * c - x2 * s_, x2 * c + x1 * s_
    got = apply_partial_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32), rot, base)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[..., rot:], x[..., rot:].astype(np.float32))
    assert rotary_dims(32, 0.25) == 8 and rotary_dims(64, 0.25) == 16
    with pytest.raises(ValueError, match=r"int\(12 \* 0.25\) = 3 must be an even number"):
        rotary_dims(12, 0.25)


@pytest.mark.torch
def test_gpt_neox_layer_matches_a_torch_rebuild_of_hf_gpt_neox_layer():
    """HF ``GPTNeoXLayer`` (use_parallel_residual, rotary_pct 0.25, gelu, eps 1e-5) rebuilt in
    torch from its formulas (transformers is not a dependency), on the same weights."""
    torch = pytest.importorskip("torch")
    B, T, H, hd = 2, 6, 2, 16
    C, rot = H * hd, rotary_dims(hd, 0.25)
    layer = GPTNeoXLayer(H, hd)
    x = jax.random.normal(jax.random.key(3), (B, T, C))
    mask = jnp.tril(jnp.ones((T, T), bool))
    variables = layer.init(jax.random.key(4), x, mask=mask)
    # random biases and LN affine too, so a wrong bias or LN mapping cannot hide behind zeros
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    variables = jax.tree.unflatten(
        tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    y, _ = layer.apply(variables, x, mask=mask)
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a), dtype=torch.float64),
                     variables["params"])  # fmt: skip
    lin = lambda d, h: torch.nn.functional.linear(h, d["kernel"].T, d["bias"])  # noqa: E731
    ln = lambda d, h: torch.nn.functional.layer_norm(h, (C,), d["scale"], d["bias"], 1e-5)  # noqa: E731

    def rotate_half(t):
        return torch.cat([-t[..., t.shape[-1] // 2 :], t[..., : t.shape[-1] // 2]], dim=-1)

    xt = torch.tensor(np.asarray(x), dtype=torch.float64)
    a = p["attention"]
    qkv = lin(a["query_key_value"], ln(p["input_layernorm"], xt))
    qkv = qkv.view(B, T, H, 3 * hd).permute(0, 2, 1, 3)  # [B, H, T, 3 hd], HF's layout
    q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = torch.cat([q[..., :rot] * cos + rotate_half(q[..., :rot]) * sin, q[..., rot:]], -1)
    k = torch.cat([k[..., :rot] * cos + rotate_half(k[..., :rot]) * sin, k[..., rot:]], -1)
    s = q @ k.transpose(-1, -2) / hd**0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    attn = lin(a["dense"], o)
    m = p["mlp"]
    h = torch.nn.functional.gelu(lin(m["dense_h_to_4h"], ln(p["post_attention_layernorm"], xt)))
    want = xt + attn + lin(m["dense_4h_to_h"], h)  # parallel residual
    np.testing.assert_allclose(np.asarray(y), want.numpy(), rtol=1e-4, atol=1e-4)


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
    with pytest.raises(ValueError, match=r"token decoder's heads of 12 with rotary_pct=0.25"):
        BlockTransformerConfig(token_dim=24, token_heads=2)
    with pytest.raises(ValueError, match="decoder_layer must be 'gpt_neox' or 'pre_ln'"):
        BlockTransformerConfig(decoder_layer="neox")
    with pytest.raises(ValueError, match=r"start_token must be an int in \[0, vocab_size=50304\)"):
        BlockTransformerConfig(start_token=50304)
    with pytest.raises(ValueError, match="block_heads=3"):
        BlockTransformer(**{**KW, "block_heads": 3}).init(jax.random.key(0), _tokens(1, 4))
