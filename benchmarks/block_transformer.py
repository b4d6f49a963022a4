"""Block Transformer vs a vanilla Transformer LM: greedy generation throughput and KV-cache size.

Block Transformer (Ho et al., https://arxiv.org/abs/2406.02657) at the official
``block_main_b4_5`` sizes (`block_transformer_b4_5`, GPT-NeoX decoders as the official code)
against a vanilla `TransformerLM` at the official ``vanilla_31`` sizes (6 layers, width 256, 8
heads, vocabulary 50304): about the same non-embedding size (the block model's 46.7M total
includes the official model's unused 12.9M block-decoder ``embed_in`` table and its other
vocabulary tables), random weights (speed only). Batch 8, a
``prompt``-token prompt, then ``new`` tokens greedily, each generation one jitted program with a
KV cache (`jaxblocks.models.block_transformer.generate`; for the vanilla model the prompt is
prefilled causally, computing the output head at its last position only, then one cached step
per token). Prefill alone is timed as its own program; decode throughput is
``batch · new / (generation time − prefill time)``. Times are medians of interleaved runs on
XLA:CPU. KV-cache bytes are those the programs allocate: the vanilla cache holds every token of
every layer, the Block Transformer's block decoder one entry per block and its token decoder
``expansion_ratio + L_B − 1`` positions.

The paper reports 10-20× higher throughput at equal perplexity on GPUs, where batch size is
limited by KV-cache memory (batch grows until memory is full); here the batch is fixed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import interleaved_medians
from jaxblocks.models.block_transformer import (
    BlockTransformer,
    generate,
    init_block_caches,
    init_token_caches,
)
from jaxblocks.models.transformer_lm import TransformerLM, init_caches
from jaxblocks.registry import create_model

BATCH = 8
VANILLA = dict(vocab_size=50304, dim=256, depth=6, num_heads=8)  # conf/trainer/vanilla_31.yaml
# (prompt tokens, new tokens)
CASES = ((128, 128), (512, 128), (2048, 128))
QUICK_CASES = ((128, 32),)


def _vanilla_prefill(model, tokens, caches):
    """Causal prefill that runs the output head at the last position only."""
    x = model.embed(tokens)
    new = []
    for blk, c in zip(model.blocks, caches, strict=True):
        x, c = blk(x, cache=c, chunk_causal=True)
        new.append(c)
    return model.head(model.ln_f(x[:, -1])), new


def vanilla_prefill(model: TransformerLM, variables, prompt, max_len):
    logits, caches = model.apply(variables, prompt, init_caches(model, prompt.shape[0], max_len),
                                 method=_vanilla_prefill)  # fmt: skip
    return jnp.argmax(logits, axis=-1).astype(prompt.dtype), caches


def vanilla_generate(model: TransformerLM, variables, prompt, num_tokens):
    B, P = prompt.shape
    first, caches = vanilla_prefill(model, variables, prompt, P + num_tokens)
    out = jnp.zeros((B, num_tokens), prompt.dtype).at[:, 0].set(first)

    def step(i, carry):
        out, caches = carry
        tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        logits, caches = model.apply(variables, tok, caches, method=TransformerLM.decode)
        return out.at[:, i].set(jnp.argmax(logits[:, 0], -1).astype(out.dtype)), caches

    out, _ = jax.lax.fori_loop(1, num_tokens, step, (out, caches))
    return out


def block_prefill(model: BlockTransformer, variables, prompt, num_blocks):
    caches = init_block_caches(model, prompt.shape[0], 1 + prompt.shape[1] // model.block_len
                               + num_blocks)  # fmt: skip
    ctx, caches = model.apply(variables, prompt, caches, start=True,
                              method=BlockTransformer.decode_blocks)  # fmt: skip
    logits, _ = model.apply(variables, ctx, init_token_caches(model, prompt.shape[0]),
                            method=BlockTransformer.decode_prefix)  # fmt: skip
    return jnp.argmax(logits, axis=-1), caches


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _n_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def run(quick: bool = False) -> str:
    block = create_model("block_transformer_b4_5")
    vanilla = TransformerLM(**VANILLA)
    L = block.block_len
    key = jax.random.key(0)
    init_tokens = jnp.zeros((1, 4 * L), jnp.int32)
    bvars = jax.jit(block.init)(jax.random.key(1), init_tokens)
    vvars = jax.jit(vanilla.init)(jax.random.key(2), init_tokens)
    rows = [
        f"Block Transformer `block_transformer_b4_5` ({_n_params(bvars) / 1e6:.1f}M params, "
        f"L_B {L}) vs vanilla `TransformerLM` {VANILLA} ({_n_params(vvars) / 1e6:.1f}M params); "
        f"batch {BATCH}, greedy, random weights, XLA:CPU, one jitted program per generation. "
        "tok/s counts generated tokens of the whole batch; decode excludes the prefill.\n",
        "| prompt | new | prefill vanilla | prefill block | generate vanilla | generate block "
        "| end-to-end tok/s vanilla → block | speed-up | decode tok/s vanilla → block | "
        "decode speed-up | KV cache vanilla → block |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for P, N in QUICK_CASES if quick else CASES:
        prompt = jax.random.randint(key, (BATCH, P), 0, VANILLA["vocab_size"], jnp.int32)
        nb = N // L
        v_pre = jax.jit(lambda v, p, N=N: vanilla_prefill(vanilla, v, p, p.shape[1] + N))
        v_gen = jax.jit(lambda v, p, N=N: vanilla_generate(vanilla, v, p, N))
        b_pre = jax.jit(lambda v, p, nb=nb: block_prefill(block, v, p, nb))
        b_gen = jax.jit(lambda v, p, nb=nb: generate(block, v, p, nb))
        assert v_gen(vvars, prompt).shape == b_gen(bvars, prompt).shape == (BATCH, N)
        kv_v = _nbytes(jax.eval_shape(functools.partial(init_caches, vanilla, BATCH, P + N)))
        kv_b = _nbytes(
            jax.eval_shape(functools.partial(init_block_caches, block, BATCH, 1 + P // L + nb))
        ) + _nbytes(jax.eval_shape(functools.partial(init_token_caches, block, BATCH)))
        fns = {
            "v_pre": functools.partial(v_pre, vvars, prompt),
            "b_pre": functools.partial(b_pre, bvars, prompt),
            "v_gen": functools.partial(v_gen, vvars, prompt),
            "b_gen": functools.partial(b_gen, bvars, prompt),
        }
        t = interleaved_medians(fns, 3 if quick or P >= 2048 else 5, warmup=1)
        e2e = {k: BATCH * N / t[f"{k}_gen"] for k in ("v", "b")}
        dec = {k: BATCH * N / max(t[f"{k}_gen"] - t[f"{k}_pre"], 1e-9) for k in ("v", "b")}
        ms = {k: f"{1e3 * s:.0f} ms" for k, s in t.items()}
        rows.append(
            f"| {P} | {N} | {ms['v_pre']} | {ms['b_pre']} | {ms['v_gen']} | {ms['b_gen']} | "
            f"{e2e['v']:.0f} → {e2e['b']:.0f} | {e2e['b'] / e2e['v']:.2f}× | "
            f"{dec['v']:.0f} → {dec['b']:.0f} | {dec['b'] / dec['v']:.2f}× | "
            f"{kv_v / 2**20:.1f} → {kv_b / 2**20:.2f} MiB ({kv_v / kv_b:.0f}×) |"
        )
    return "\n".join(rows) + "\n"
