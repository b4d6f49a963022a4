"""BCT: blockwise weights and activations of a whole Transformer, without retraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.compress.bct import (
    BCTRecipe,
    bct_activation_quant,
    bct_compress,
    bct_weights,
    mean_compression,
)
from jaxblocks.models.transformer_lm import TransformerLM

KW = dict(vocab_size=32, dim=32, depth=2, num_heads=2)


def _setup():
    model = TransformerLM(**KW)
    toks = jax.random.randint(jax.random.key(0), (2, 24), 0, 32)
    return model, model.init(jax.random.key(1), toks), toks


def test_every_parameter_is_quantised_blockwise_with_a_report():
    model, v, _ = _setup()
    q, report = bct_weights(v, BCTRecipe(weight_bits=4, block=16))
    n_params = len(jax.tree.leaves(v["params"]))
    assert len(report) == n_params  # embeddings, kernels, LayerNorm scales and biases
    for path, r in report.items():
        assert r["bits"] == 4 and r["compression"] > 4, path
    # a 4-bit blockwise tensor has at most 16 levels per block
    k = np.asarray(q["params"]["blocks_0"]["fc1"]["kernel"])[:16, :16]
    assert len(np.unique(k)) <= 16
    assert 4 < mean_compression(report, v) < 8


def test_activation_hook_quantises_every_intermediate():
    model, v, toks = _setup()
    seen = []

    def spy(x, name):
        seen.append(name)
        return x

    model.clone(act_quant=spy).apply(v, toks)
    for name in ("embed", "query", "key", "value", "scores", "probs", "attn_out", "proj_out",
                 "ln1", "residual1", "ln2", "fc1", "gelu", "fc2", "residual2", "ln_f"):  # fmt: skip
        assert name in seen, name
    x = jax.random.normal(jax.random.key(2), (3, 5, 24))
    y = bct_activation_quant(BCTRecipe(act_bits=4, block=8))(x, "any")
    levels = [len(np.unique(np.asarray(y)[0, 0, i : i + 8])) for i in (0, 8, 16)]
    assert max(levels) <= 16 and float(jnp.max(jnp.abs(y - x))) > 0
    assert bct_activation_quant(BCTRecipe(act_bits=None)) is None


def test_error_shrinks_with_bits_and_8_bit_is_close_to_float():
    model, v, toks = _setup()
    ref = model.apply(v, toks)
    errs = []
    for bits in (4, 6, 8):
        qm, qv, _ = bct_compress(model, v, BCTRecipe(weight_bits=bits, act_bits=bits, block=16))
        out = qm.apply(qv, toks)
        errs.append(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05  # 16 quantisation points, 2 blocks


def test_errors():
    with pytest.raises(ValueError, match="bits must be in"):
        BCTRecipe(weight_bits=1)
    with pytest.raises(ValueError, match="no act_quant"):
        bct_compress(object(), {"params": {}}, BCTRecipe())
