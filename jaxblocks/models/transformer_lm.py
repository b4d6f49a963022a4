"""A small softmax Transformer LM, causal or block-causal, with KV-cache decoding by tokens or by
blocks: the host of Next Block Prediction (Ren et al., "Next Block Prediction: Video Generation
via Semi-Autoregressive Modeling", https://arxiv.org/abs/2502.07737).

With ``attention="block"`` the model trains on `jaxblocks.layers.block_causal_mask` (a prefix
seen both ways, then blocks of ``block_size`` tokens that see everything up to the end of their
own block) and the next-block objective (`jaxblocks.layers.next_block_inputs_targets`: input
position t predicts the token at the same place of the next block). `generate_blocks` then
emits a whole block per decoding step, attending to the KV cache and to the current block both
ways, so a video of n blocks of k tokens takes n steps instead of n·k (`generate_tokens`, the
causal baseline). Deviation from the official code: one Transformer over a flat token sequence
with RoPE (the paper uses a 3-D-RoPE LLaMA over VQ video tokens); the attention rule and the
objective are the paper's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxblocks.layers.block_causal import block_causal_mask
from jaxblocks.layers.transformer import KVCache, TransformerBlock, init_kv_cache
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = [
    "TransformerLM",
    "TransformerLMConfig",
    "TRANSFORMER_LM_PRESETS",
    "generate_blocks",
    "generate_tokens",
    "init_caches",
]

ATTENTIONS = ("causal", "block")


@dataclasses.dataclass(frozen=True)
class TransformerLMConfig:
    """Token embedding, ``depth`` pre-LN blocks, final LayerNorm, untied output projection."""

    vocab_size: int = 256
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    attention: str = "causal"
    block_size: int = 1
    prefix_len: int = 0

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"TransformerLMConfig.attention must be one of {ATTENTIONS}, got "
                             f"{self.attention!r}")  # fmt: skip
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"TransformerLMConfig: dim={self.dim} must split into "
                             f"{self.num_heads} heads of an even width")  # fmt: skip
        if min(self.vocab_size, self.depth, self.block_size, self.mlp_ratio) < 1:
            raise ValueError(f"TransformerLMConfig: sizes must be >= 1, got {self}")
        if self.prefix_len < 0:
            raise ValueError(f"TransformerLMConfig.prefix_len must be >= 0, got {self.prefix_len}")


class TransformerLM(nn.Module):
    """Softmax Transformer LM (see `TransformerLMConfig`); ``__call__`` scores a whole sequence
    under the training mask, `decode` extends a list of `KVCache` by one chunk. ``act_quant``
    (``fn(x, name) -> x``) wraps every intermediate activation (BCT's fake quantisation)."""

    vocab_size: int = 256
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    attention: str = "causal"
    block_size: int = 1
    prefix_len: int = 0
    act_quant: Any = None
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def setup(self):
        TransformerLMConfig(self.vocab_size, self.dim, self.depth, self.num_heads,
                            self.mlp_ratio, self.attention, self.block_size,
                            self.prefix_len)  # fmt: skip
        kw = dict(dtype=self.dtype)
        self.embed = nn.Embed(self.vocab_size, self.dim, **kw)
        self.blocks = [
            TransformerBlock(
                self.num_heads, self.head_dim, self.mlp_ratio, **kw, act_quant=self.act_quant
            )  # fmt: skip
            for _ in range(self.depth)
        ]
        self.ln_f = nn.LayerNorm(**kw)
        self.head = nn.Dense(self.vocab_size, **kw)

    def _check_tokens(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"TransformerLM: tokens must be integer [B, T], got "
                             f"{tokens.dtype}{tuple(tokens.shape)}")  # fmt: skip

    def training_mask(self, seq_len: int) -> Array:
        """The ``[T, T]`` mask of ``__call__``: causal, or block-causal after ``prefix_len``."""
        if self.attention == "causal":
            return jnp.tril(jnp.ones((seq_len, seq_len), bool))
        return jnp.asarray(block_causal_mask(seq_len, min(self.prefix_len, seq_len),
                                             self.block_size))  # fmt: skip

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        """Logits of every position under the training mask (in ``dtype``)."""
        self._check_tokens(tokens)
        mask = self.training_mask(tokens.shape[1])
        x = self._aq(self.embed(tokens), "embed")
        for blk in self.blocks:
            x, _ = blk(x, mask=mask)
        return self.head(self._aq(self.ln_f(x), "ln_f"))

    def _aq(self, x, name):
        return x if self.act_quant is None else self.act_quant(x, name)

    def decode(
        self, tokens: Int[Array, "B t"], caches: list[KVCache], *, chunk_causal: bool = False
    ) -> tuple[Float[Array, "B t V"], list[KVCache]]:
        """Append ``tokens`` to every layer's cache; logits of the chunk."""
        self._check_tokens(tokens)
        if len(caches) != self.depth:
            raise ValueError(f"TransformerLM.decode: {len(caches)} caches for {self.depth} layers")
        x = self._aq(self.embed(tokens), "embed")
        new = []
        for blk, c in zip(self.blocks, caches, strict=True):
            x, c = blk(x, cache=c, chunk_causal=chunk_causal)
            new.append(c)
        return self.head(self._aq(self.ln_f(x), "ln_f")), new


def init_caches(model: TransformerLM, batch: int, max_len: int) -> list[KVCache]:
    """Empty caches, one per layer, for ``max_len`` positions."""
    return [init_kv_cache(batch, max_len, model.num_heads, model.head_dim)
            for _ in range(model.depth)]  # fmt: skip


def _check_room(fn: str, need: int, max_len: int | None) -> int:
    max_len = need if max_len is None else max_len
    if need > max_len:
        raise ValueError(f"{fn}: {need} positions do not fit max_len={max_len}")
    return max_len


def generate_tokens(
    model: TransformerLM, variables, prompt: Int[Array, "B P"], num_tokens: int
) -> Int[Array, "B N"]:
    """Greedy token-by-token decoding of a causal model: the prompt is prefilled causally, then
    one decoding step per new token (``num_tokens`` steps). Returns the ``num_tokens`` tokens."""
    B, P = prompt.shape
    if P < 1 or num_tokens < 1:
        raise ValueError(f"generate_tokens: need a prompt and num_tokens >= 1, got {prompt.shape}, "
                         f"{num_tokens}")  # fmt: skip
    caches = init_caches(model, B, _check_room("generate_tokens", P + num_tokens, None))
    logits, caches = model.apply(variables, prompt, caches, chunk_causal=True,
                                 method=TransformerLM.decode)  # fmt: skip
    first = jnp.argmax(logits[:, -1], axis=-1).astype(prompt.dtype)  # [B]
    out = jnp.zeros((B, num_tokens), prompt.dtype).at[:, 0].set(first)

    def step(i, carry):
        out, caches = carry
        tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        logits, caches = model.apply(variables, tok, caches, method=TransformerLM.decode)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(out.dtype)
        return out.at[:, i].set(nxt), caches

    out, _ = jax.lax.fori_loop(1, num_tokens, step, (out, caches))
    return out


def generate_blocks(
    model: TransformerLM,
    variables,
    context: Int[Array, "B P"],
    num_blocks: int,
) -> Int[Array, "B N"]:
    """Semi-autoregressive Next Block Prediction: one decoding step per block.

    ``context`` is the model's prefix (``prefix_len`` tokens, attended both ways) followed by
    the first block of ``block_size`` tokens (given: the first frame). Each step feeds the
    latest block, which attends to the cache and to itself both ways, and reads the whole next
    block off its logits (greedy), as the next-block objective trained it to.

    Returns:
      ``[B, num_blocks · block_size]``: the generated blocks after the given one.
    """
    if model.attention != "block":
        raise ValueError("generate_blocks: the model must be built with attention='block'")
    k, p = model.block_size, model.prefix_len
    B, P = context.shape
    if P != p + k or num_blocks < 1:
        raise ValueError(
            f"generate_blocks: context must be [B, prefix_len + block_size] = [B, {p + k}] "
            f"and num_blocks >= 1, got {context.shape}, {num_blocks}"
        )
    caches = init_caches(model, B, P + (num_blocks - 1) * k)
    if p:
        _, caches = model.apply(variables, context[:, :p], caches, method=TransformerLM.decode)
    logits, caches = model.apply(variables, context[:, p:], caches, method=TransformerLM.decode)
    first = jnp.argmax(logits, axis=-1).astype(context.dtype)  # [B, k]
    out = jnp.zeros((B, num_blocks * k), context.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, first, 0, axis=1)

    def step(i, carry):
        out, caches = carry
        blk = jax.lax.dynamic_slice_in_dim(out, (i - 1) * k, k, axis=1)  # [B, k]
        logits, caches = model.apply(variables, blk, caches, method=TransformerLM.decode)
        nxt = jnp.argmax(logits, axis=-1).astype(out.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, nxt, i * k, axis=1), caches

    out, _ = jax.lax.fori_loop(1, num_blocks, step, (out, caches))
    return out


TRANSFORMER_LM_PRESETS = {
    "transformer_lm_tiny": TransformerLMConfig(),
    # moving-digit videos: 8×8 frames of 4 grey levels, one frame per block (`moving_digits`)
    "nbp_video_tiny": TransformerLMConfig(
        vocab_size=4, dim=96, depth=3, num_heads=4, attention="block", block_size=64
    ),  # fmt: skip
}


def _example(config: TransformerLMConfig) -> Array:
    n = max(2 * config.block_size, 16) + config.prefix_len
    return (jnp.arange(2 * n, dtype=jnp.int32).reshape(2, n) * 7) % config.vocab_size


register_presets(
    TransformerLM.from_config,
    TRANSFORMER_LM_PRESETS,
    example_input=_example,
    doc="{name}: a small softmax Transformer LM (causal or Next-Block-Prediction block mask).",
    paper=Paper(
        "Next Block Prediction: Video Generation via Semi-Autoregressive Modeling",
        arxiv="2502.07737",
        code="https://github.com/RenShuhuai-Andy/NBP",
    ),
    params_source="no published count: jaxblocks demo sizes (the paper's models are 700M-3B "
    "LLaMA-style Transformers over VQ video tokens)",
    tiny={"dim": 32, "depth": 1, "num_heads": 2},
)
