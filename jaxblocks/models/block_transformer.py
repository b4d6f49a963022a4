"""Block Transformer (Ho et al., "Block Transformer: Global-to-Local Language Modeling for Fast
Inference", https://arxiv.org/abs/2406.02657): a coarse causal *block decoder* over block
embeddings and a fine *token decoder* that attends only inside one block.

The sequence is cut into blocks of ``block_len`` (L_B) tokens. The **embedder** looks each token
up in a small table (``embed_dim`` d_e) and concatenates the L_B vectors into one block embedding
of ``block_dim = block_len · embed_dim`` (the official ``lookup`` embedder with
``projection_method: concat``, one embedding token per block). The **block decoder** is a causal
Transformer over the block embeddings; its output after blocks ``0..i`` is the context of block
``i + 1``. The **token decoder** decodes each block on its own: the context goes through the
*expansion layer* (a linear map to ``expansion_ratio`` prefix vectors of width ``token_dim``, the
official ``expansion_layer`` Conv1d of kernel 1), which replace the token decoder's BOS, then the
block's tokens follow, attending causally to the prefix and to each other and to nothing else.
Decoding therefore keeps a KV cache of one entry per block for the block decoder, and a cache of
at most ``expansion_ratio + L_B - 1`` positions for the token decoder, reset at every block.

Both decoders are GPT-NeoX (Pythia) stacks of `jaxblocks.blocks.block_transformer.GPTNeoXLayer`
(parallel residual, fused head-interleaved ``query_key_value`` and ``dense`` with biases, rotary
on 25 % of each head, GELU MLP of 4·d with biases, LayerNorm eps 1e-5, a ``final_layer_norm``),
with the official config rule for heads (head width 32 up to d 256, else 64), vocabulary 50304
(the Pythia tokenizer's) and an untied ``embed_out``. The block decoder also holds the official
model's *unused* ``embed_in`` table (``block_embed_in``, 50304 × d: the official block decoder is a
``GPTNeoXModel`` fed ``inputs_embeds``, and its table stays in the official count), so the
parameter counts equal the official ones exactly (``unused_embed_in=False`` drops it). Inits
follow HF: N(0, 0.02) kernels and tables, zero biases; the expansion layer N(0, d_block^-1/2).
``decoder_layer="pre_ln"`` swaps both decoders for the project's pre-LN RoPE blocks
(`jaxblocks.layers.transformer.TransformerBlock`: the earlier non-official variant, here with
the parameter-free start block below instead of its learned start vector).

Deviations from the official code (itsnamgyu/block-transformer):

* The official model never predicts the first block (block ``i``'s context predicts block
  ``i + 1``, block 0 has none; training pads the first block with a random number of pad tokens
  instead). Here the block decoder's input starts with the block embedding of ``block_len``
  copies of ``start_token`` (default 0, Pythia's ``<|endoftext|>``, the separator between the
  Pile's documents), the analogue of a vanilla LM's BOS token, so the first block has a context
  and ``__call__`` gives logits for every position with the standard next-token convention.
  This start block is parameter-free (it reuses the embedder's table), so the counts stay exact.
* No padding, document-boundary or ``block_attention_mask`` handling: every block is full.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxblocks.blocks.block_transformer import GPTNeoXLayer, rotary_dims
from jaxblocks.layers.transformer import KVCache, TransformerBlock, init_kv_cache
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = [
    "BLOCK_TRANSFORMER_PRESETS",
    "BlockTransformer",
    "BlockTransformerConfig",
    "generate",
    "init_block_caches",
    "init_token_caches",
    "official_num_heads",
]

PYTHIA_VOCAB = 50304


def official_num_heads(dim: int) -> int:
    """The official config rule (``util/config.py``) for a GPT-NeoX width without explicit
    heads: head width 32 up to 256, 64 up to 1536, else 128."""
    head = 32 if dim <= 256 else 64 if dim <= 1536 else 128
    if dim % head:
        raise ValueError(f"official_num_heads: dim={dim} is not a multiple of {head}")
    return dim // head


@dataclasses.dataclass(frozen=True)
class BlockTransformerConfig:
    """Sizes of a Block Transformer (see the module docstring).

    Attributes:
      vocab_size: tokens (shared by the embedder and the token decoder, as with the Pythia
        tokenizer on both sides).
      block_len: L_B, tokens per block.
      embed_dim: d_e, the embedder's width per token; the block decoder's width is
        ``block_len · embed_dim``.
      block_depth, block_heads: block decoder layers and heads.
      token_dim, token_depth, token_heads: token decoder width, layers and heads.
      expansion_ratio: prefix vectors the expansion layer makes from one block context.
      mlp_ratio: MLP hidden width as a multiple of the model width (both decoders).
      rotary_pct: fraction of each head the rotary embedding rotates (Pythia 0.25; GPT-NeoX
        layers only).
      start_token: the token whose block (``block_len`` copies) stands first in the block
        decoder's input (Pythia's ``<|endoftext|>`` = 0).
      decoder_layer: ``"gpt_neox"`` (official) or ``"pre_ln"`` (the project's pre-LN RoPE block).
      unused_embed_in: keep the official block decoder's unused ``embed_in`` table (counted in
        the official totals).
    """

    vocab_size: int = PYTHIA_VOCAB
    block_len: int = 4
    embed_dim: int = 64
    block_depth: int = 3
    block_heads: int = 8
    token_dim: int = 256
    token_depth: int = 3
    token_heads: int = 8
    expansion_ratio: int = 2
    mlp_ratio: int = 4
    rotary_pct: float = 0.25
    start_token: int = 0
    decoder_layer: str = "gpt_neox"
    unused_embed_in: bool = True

    @property
    def block_dim(self) -> int:
        return self.block_len * self.embed_dim

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in _SIZE_FIELDS}
        small = {k: v for k, v in sizes.items()
                 if not isinstance(v, int) or isinstance(v, bool) or v < 1}  # fmt: skip
        if small:
            raise ValueError(f"BlockTransformerConfig: sizes must be ints >= 1, got {small}")
        if self.decoder_layer not in ("gpt_neox", "pre_ln"):
            raise ValueError(f"BlockTransformerConfig: decoder_layer must be 'gpt_neox' or "
                             f"'pre_ln', got {self.decoder_layer!r}")  # fmt: skip
        if not isinstance(self.start_token, int) or not 0 <= self.start_token < self.vocab_size:
            raise ValueError(
                f"BlockTransformerConfig: start_token must be an int in "
                f"[0, vocab_size={self.vocab_size}), got {self.start_token!r}"
            )
        for name, dim, heads in (
            ("block", self.block_dim, self.block_heads),
            ("token", self.token_dim, self.token_heads),
        ):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(
                    f"BlockTransformerConfig: the {name} decoder's width {dim} must split into "
                    f"{name}_heads={heads} heads of an even width"
                )
            if self.decoder_layer == "gpt_neox":
                try:
                    rotary_dims(dim // heads, self.rotary_pct)
                except ValueError as e:
                    raise ValueError(
                        f"BlockTransformerConfig: the {name} decoder's heads of "
                        f"{dim // heads} with rotary_pct={self.rotary_pct}: {e}"
                    ) from e


_SIZE_FIELDS = ("vocab_size", "block_len", "embed_dim", "block_depth", "block_heads", "token_dim",
                "token_depth", "token_heads", "expansion_ratio", "mlp_ratio")  # fmt: skip


class BlockTransformer(nn.Module):
    """Block Transformer (Ho et al., https://arxiv.org/abs/2406.02657): global block decoder,
    local token decoder.

    Unlike `jaxblocks.models.transformer_lm.TransformerLM`, no token attends to the tokens of
    earlier blocks: those reach it only through the block decoder's context (one vector per
    block), so the decoding cache grows by one entry per block rather than per token.

    Attributes:
      vocab_size, block_len, embed_dim, block_depth, block_heads, token_dim, token_depth,
      token_heads, expansion_ratio, mlp_ratio, rotary_pct, start_token, decoder_layer,
      unused_embed_in: see `BlockTransformerConfig`.
      dtype: compute dtype (None: fp32); parameters are stored in fp32.

    ``__call__(tokens [B, T]) -> logits [B, T, V]``: ``logits[:, t]`` scores token ``t + 1``
    given tokens ``0..t`` (T a multiple of ``block_len``). Example::

        model = BlockTransformer(vocab_size=64, embed_dim=8, token_dim=32, block_heads=2,
                                 token_heads=2)
        tokens = jnp.zeros((2, 8), jnp.int32)
        variables = model.init(jax.random.key(0), tokens)
        logits = model.apply(variables, tokens)  # [2, 8, 64]
        new = generate(model, variables, tokens, num_blocks=3)  # [2, 12]
    """

    vocab_size: int = PYTHIA_VOCAB
    block_len: int = 4
    embed_dim: int = 64
    block_depth: int = 3
    block_heads: int = 8
    token_dim: int = 256
    token_depth: int = 3
    token_heads: int = 8
    expansion_ratio: int = 2
    mlp_ratio: int = 4
    rotary_pct: float = 0.25
    start_token: int = 0
    decoder_layer: str = "gpt_neox"
    unused_embed_in: bool = True
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @property
    def config(self) -> BlockTransformerConfig:
        return BlockTransformerConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(BlockTransformerConfig)}
        )

    @property
    def block_dim(self) -> int:
        return self.block_len * self.embed_dim

    def setup(self):
        self.config  # noqa: B018 (validates the sizes)
        kw = dict(dtype=self.dtype)
        init = nn.initializers.normal(0.02)  # the official initializer_range
        self.embedder = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=init, **kw)
        d, t = self.block_dim, self.token_dim
        if self.unused_embed_in:
            # The official block decoder is a whole GPTNeoXModel fed `inputs_embeds`: its token
            # table is never read, but it is a parameter of the official model and of its count.
            self.block_embed_in = self.param("block_embed_in", init, (self.vocab_size, d))
        self.block_layers = [self._layer(d, self.block_heads) for _ in range(self.block_depth)]
        self.block_ln = nn.LayerNorm(1e-5, **kw)  # final_layer_norm
        # Conv1d(kernel 1) in the official code, initialised N(0, d_block^-1/2) with zero bias
        self.expansion = nn.Dense(self.expansion_ratio * t,
                                  kernel_init=nn.initializers.normal(d**-0.5), **kw)  # fmt: skip
        self.token_embed = nn.Embed(self.vocab_size, t, embedding_init=init, **kw)
        self.token_layers = [self._layer(t, self.token_heads) for _ in range(self.token_depth)]
        self.token_ln = nn.LayerNorm(1e-5, **kw)  # final_layer_norm
        self.head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=init,
                             **kw)  # untied, as embed_out  # fmt: skip

    def _layer(self, dim: int, heads: int) -> nn.Module:
        if self.decoder_layer == "pre_ln":
            return TransformerBlock(heads, dim // heads, self.mlp_ratio, dtype=self.dtype)
        return GPTNeoXLayer(heads, dim // heads, self.mlp_ratio, self.rotary_pct,
                            dtype=self.dtype)  # fmt: skip

    # ---- validation --------------------------------------------------------------------------

    def _check_tokens(self, fn: str, name: str, tokens, *, allow_empty: bool = False):
        if (
            tokens.ndim != 2
            or not jnp.issubdtype(tokens.dtype, jnp.integer)
            or tokens.shape[1] % self.block_len
            or (tokens.shape[1] == 0 and not allow_empty)
        ):
            raise ValueError(
                f"{fn}: {name} must be integer [B, T] with T a positive multiple of "
                f"block_len={self.block_len}, got {tokens.dtype}{tuple(tokens.shape)}"
            )

    # ---- the three parts ---------------------------------------------------------------------

    def embed_blocks(self, tokens: Int[Array, "B T"]) -> Float[Array, "B N D"]:
        """Lookup embedder: ``[B, N·L_B]`` tokens -> ``[B, N, L_B·d_e]`` block embeddings."""
        B, T = tokens.shape
        e = self.embedder(tokens)  # [B, T, d_e]
        return e.reshape(B, T // self.block_len, self.block_dim)

    def _start(self, batch: int) -> Float[Array, "B 1 D"]:
        """The start block: the embedding of ``block_len`` copies of ``start_token``."""
        return self.embed_blocks(jnp.full((batch, self.block_len), self.start_token, jnp.int32))

    def _block_stack(self, x, *, mask=None, caches=None):
        new = []
        for i, layer in enumerate(self.block_layers):
            x, c = layer(x, mask=mask, cache=None if caches is None else caches[i],
                         chunk_causal=True)  # fmt: skip
            new.append(c)
        return self.block_ln(x), (None if caches is None else new)

    def block_contexts(self, tokens: Int[Array, "B T"]) -> Float[Array, "B N1 D"]:
        """Block decoder over ``[start block, block 0, ..., block N-1]``: ``[B, N + 1, D]``, where
        output ``i`` is the context of block ``i`` (it has seen blocks ``< i``)."""
        self._check_tokens("BlockTransformer.block_contexts", "tokens", tokens)
        e = self.embed_blocks(tokens)
        x = jnp.concatenate([self._start(e.shape[0]), e], axis=1)  # [B, N+1, D]
        n = x.shape[1]
        ctx, _ = self._block_stack(x, mask=jnp.tril(jnp.ones((n, n), bool)))
        return ctx

    def expand(self, ctx: Float[Array, "*b D"]) -> Float[Array, "*b R C"]:
        """Expansion layer: a block context -> ``expansion_ratio`` prefix vectors of the token
        decoder's width."""
        p = self.expansion(ctx)
        return p.reshape(*ctx.shape[:-1], self.expansion_ratio, self.token_dim)

    def _token_stack(self, h, *, mask=None, caches=None):
        new = []
        for i, layer in enumerate(self.token_layers):
            h, c = layer(h, mask=mask, cache=None if caches is None else caches[i],
                         chunk_causal=True)  # fmt: skip
            new.append(c)
        return self.token_ln(h), (None if caches is None else new)

    def token_logits(
        self, tokens: Int[Array, "B T"], ctx: Float[Array, "B N1 D"]
    ) -> Float[Array, "B T V"]:
        """Token decoder of every block at once, given the block contexts ``ctx`` (as
        `block_contexts` returns): ``logits[:, t]`` scores token ``t + 1``.

        Window ``w`` (block ``w``) reads ``[prefix(ctx_w), x_{wL}, ..., x_{wL+L-2}]`` causally
        and scores ``x_{wL}, ..., x_{wL+L-1}``; window ``N`` (after the last block) only needs its
        prefix, which scores the token after the sequence.
        """
        self._check_tokens("BlockTransformer.token_logits", "tokens", tokens)
        B, T = tokens.shape
        L, R, n = self.block_len, self.expansion_ratio, tokens.shape[1] // self.block_len
        if ctx.shape != (B, n + 1, self.block_dim):
            raise ValueError(f"BlockTransformer.token_logits: ctx must be [B, N + 1, D] = "
                             f"{(B, n + 1, self.block_dim)}, got {ctx.shape}")  # fmt: skip
        prefix = self.expand(ctx)  # [B, N+1, R, C]
        # Window N has no tokens of its own; any filler works, the causal mask hides it.
        blocks = jnp.concatenate(
            [tokens.reshape(B, n, L), jnp.zeros((B, 1, L), tokens.dtype)], axis=1
        )  # [B, N+1, L]
        h = jnp.concatenate([prefix, self.token_embed(blocks[..., : L - 1])], axis=2)
        h = h.reshape(B * (n + 1), R + L - 1, self.token_dim)
        s = R + L - 1
        h, _ = self._token_stack(h, mask=jnp.tril(jnp.ones((s, s), bool)))
        logits = self.head(h[:, R - 1 :])  # [B·(N+1), L, V]: scores x_{wL + p}
        logits = logits.reshape(B, (n + 1) * L, self.vocab_size)
        return logits[:, 1 : T + 1]  # shift to "position t scores token t + 1"

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        """Logits of every position (in ``dtype``): ``logits[:, t]`` scores token ``t + 1``."""
        self._check_tokens("BlockTransformer", "tokens", tokens)
        return self.token_logits(tokens, self.block_contexts(tokens))

    # ---- decoding ----------------------------------------------------------------------------

    def decode_blocks(
        self, tokens: Int[Array, "B T"], caches: list[KVCache], *, start: bool = False
    ) -> tuple[Float[Array, "B D"], list[KVCache]]:
        """Append the blocks of ``tokens`` (after the start block when ``start``) to the block
        decoder's caches; return the context after the last of them."""
        self._check_tokens("BlockTransformer.decode_blocks", "tokens", tokens, allow_empty=start)
        e = self.embed_blocks(tokens)
        if start:
            e = jnp.concatenate([self._start(e.shape[0]), e], axis=1)
        ctx, caches = self._block_stack(e, caches=caches)
        return ctx[:, -1], caches

    def decode_prefix(
        self, ctx: Float[Array, "B D"], caches: list[KVCache]
    ) -> tuple[Float[Array, "B V"], list[KVCache]]:
        """Start a block: feed the expanded context to fresh token-decoder caches; return the
        logits of the block's first token."""
        h, caches = self._token_stack(self.expand(ctx), caches=caches)
        return self.head(h[:, -1]), caches

    def decode_token(
        self, token: Int[Array, " B"], caches: list[KVCache]
    ) -> tuple[Float[Array, "B V"], list[KVCache]]:
        """Feed one token of the current block; return the logits of the next one."""
        h, caches = self._token_stack(self.token_embed(token[:, None]), caches=caches)
        return self.head(h[:, -1]), caches


def init_block_caches(model: BlockTransformer, batch: int, max_blocks: int) -> list[KVCache]:
    """Empty block-decoder caches (one per layer) for ``max_blocks`` entries (the start block
    counts as one)."""
    hd = model.block_dim // model.block_heads
    return [init_kv_cache(batch, max_blocks, model.block_heads, hd)
            for _ in range(model.block_depth)]  # fmt: skip


def init_token_caches(model: BlockTransformer, batch: int) -> list[KVCache]:
    """Empty token-decoder caches for one block: the prefix and the block's first L_B - 1
    tokens."""
    hd = model.token_dim // model.token_heads
    size = model.expansion_ratio + model.block_len - 1
    return [init_kv_cache(batch, size, model.token_heads, hd) for _ in range(model.token_depth)]


def generate(
    model: BlockTransformer, variables, prompt: Int[Array, "B P"], num_blocks: int
) -> Int[Array, "B N"]:
    """Greedy decoding of ``num_blocks`` blocks after ``prompt`` (Block Transformer, Ho et al.,
    https://arxiv.org/abs/2406.02657).

    The prompt's blocks are prefilled into the block decoder's cache (one entry per block, after
    the start block). Each step then decodes one block with the token decoder from fresh
    caches of ``expansion_ratio + L_B - 1`` positions (the prefix, then one token at a time) and
    appends the finished block to the block decoder's cache. One `lax.fori_loop`, so the whole
    generation jits into one program. The official ``generate`` works the same way (a block
    decoder ``past_key_values`` and a per-block HF ``generate`` of the token decoder).

    Args:
      model: the `BlockTransformer`.
      variables: its variables.
      prompt: ``[B, P]`` integer tokens, P a multiple of ``block_len`` (0 allowed: the start
        vector alone is the context).
      num_blocks: blocks to generate, >= 1.

    Returns:
      ``[B, num_blocks · block_len]``: the generated tokens.
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"generate: num_blocks must be an int >= 1, got {num_blocks!r}")
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"generate: prompt must be integer [B, P], got "
                         f"{prompt.dtype}{tuple(prompt.shape)}")  # fmt: skip
    L = model.block_len
    B, P = prompt.shape
    if P % L:
        raise ValueError(f"generate: prompt must be [B, P] with P a multiple of block_len={L}, "
                         f"got shape {prompt.shape}")  # fmt: skip
    apply = model.apply
    caches = init_block_caches(model, B, 1 + P // L + num_blocks)
    ctx, caches = apply(variables, prompt, caches, start=True,
                        method=BlockTransformer.decode_blocks)  # fmt: skip

    def token_step(p, carry):
        block, tcaches = carry
        logits, tcaches = apply(variables, block[:, p - 1], tcaches,
                                method=BlockTransformer.decode_token)  # fmt: skip
        nxt = jnp.argmax(logits, axis=-1).astype(block.dtype)
        return block.at[:, p].set(nxt), tcaches

    def block_step(k, carry):
        out, ctx, caches = carry
        logits, tcaches = apply(variables, ctx, init_token_caches(model, B),
                                method=BlockTransformer.decode_prefix)  # fmt: skip
        block = (
            jnp.zeros((B, L), prompt.dtype)
            .at[:, 0]
            .set(jnp.argmax(logits, axis=-1).astype(prompt.dtype))
        )
        block, _ = jax.lax.fori_loop(1, L, token_step, (block, tcaches))
        out = jax.lax.dynamic_update_slice_in_dim(out, block, k * L, axis=1)
        ctx, caches = apply(variables, block, caches, method=BlockTransformer.decode_blocks)
        return out, ctx, caches

    out = jnp.zeros((B, num_blocks * L), prompt.dtype)
    out, _, _ = jax.lax.fori_loop(0, num_blocks, block_step, (out, ctx, caches))
    return out


def _preset(embed_dim: int, depth: int) -> BlockTransformerConfig:
    d = 4 * embed_dim
    h = official_num_heads(d)
    return BlockTransformerConfig(
        embed_dim=embed_dim, block_depth=depth, block_heads=h, token_dim=d, token_depth=depth,
        token_heads=h,
    )  # fmt: skip


# conf/trainer/block_main_b4_{5,19,85}.yaml: L_B 4, lookup concat embedder, expansion ratio 2,
# equal block and token decoders; the number is the official non-embedding parameter count (M).
BLOCK_TRANSFORMER_PRESETS = {
    "block_transformer_b4_5": _preset(64, 3),
    "block_transformer_b4_19": _preset(128, 3),
    "block_transformer_b4_85": _preset(192, 6),
}


def _example(config: BlockTransformerConfig) -> Array:
    n = 4 * config.block_len
    return (jnp.arange(2 * n, dtype=jnp.int32).reshape(2, n) * 7) % config.vocab_size


register_presets(
    BlockTransformer.from_config,
    BLOCK_TRANSFORMER_PRESETS,
    example_input=_example,
    doc="{name}: Block Transformer (block decoder + local token decoder), official sizes.",
    paper=Paper(
        "Block Transformer: Global-to-Local Language Modeling for Fast Inference",
        arxiv="2406.02657",
        code="https://github.com/itsnamgyu/block-transformer",
    ),
    published_params={
        "block_transformer_b4_5": 46_724_096,
        "block_transformer_b4_19": 103_147_520,
        "block_transformer_b4_85": 211_797_504,
    },
    params_source=(
        "computed from the official conf/trainer/block_main_b4_{5,19,85}.yaml over the "
        "pythia-410m GPT-NeoX config (itsnamgyu/block-transformer; the presets' names are the "
        "non-embedding counts 4,871,168 / 19,441,664 / 86,238,720 in millions): lookup "
        "embedder 50304 x d/4, block decoder GPTNeoXModel (12d^2 + 13d per layer, final LN, and "
        "its unused 50304 x d embed_in), expansion Conv1d d -> 2d with bias, token decoder "
        "GPTNeoXModel with embed_in and untied embed_out; matched exactly (the start block is "
        "parameter-free)"
    ),
    tiny={
        "vocab_size": 256,
        "embed_dim": 16,
        "block_heads": 2,
        "token_dim": 64,
        "token_heads": 2,
    },  # fmt: skip
)
