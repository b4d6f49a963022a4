"""Next Block Prediction's block-causal mask against an explicit loop (the official
``get_attn_mask`` rules), and the next-block objective's shifts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import block_causal_mask, next_block_inputs_targets


def _loop_mask(seq_len, prefix_len, block):
    """The official loop: every row sees the prefix; video rows of a block see the video up to
    that block's end."""
    m = np.zeros((seq_len, seq_len), bool)
    m[:, :prefix_len] = True
    for i in range(prefix_len, seq_len, block):
        m[i : i + block, prefix_len : i + block] = True
    return m


@pytest.mark.parametrize(
    ("seq_len", "prefix_len", "block"),
    [(10, 0, 1), (10, 0, 3), (11, 2, 4), (17, 5, 16), (7, 7, 2), (0, 0, 1), (9, 1, 9), (12, 3, 5)],
)
def test_mask_equals_the_official_loop(seq_len, prefix_len, block):
    got = block_causal_mask(seq_len, prefix_len, block)
    assert got.shape == (seq_len, seq_len) and got.dtype == bool
    np.testing.assert_array_equal(got, _loop_mask(seq_len, prefix_len, block))


def test_mask_properties():
    m = block_causal_mask(14, 3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # prefix: bidirectional, sees no video
    assert m[3:7, 3:7].all() and not m[3:7, 7:].any()  # first block: bidirectional, causal
    assert m[11:, 3:].all()  # the last (shorter) block sees all the video
    np.testing.assert_array_equal(block_causal_mask(6, 0, 1), np.tril(np.ones((6, 6), bool)))
    for bad, match in (((5, 6, 1), "prefix_len=6 exceeds"), ((5, 0, 0), "block_size must"),
                       ((5, -1, 1), "prefix_len must"), ((5.0, 0, 1), "seq_len must")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            block_causal_mask(*bad)


def test_next_block_inputs_and_targets():
    tokens = jnp.arange(2 * 9).reshape(2, 9)
    x, y = next_block_inputs_targets(tokens, 3)
    np.testing.assert_array_equal(x, tokens[:, :6])
    np.testing.assert_array_equal(y, tokens[:, 3:])  # position t predicts t + block_size
    x, y = next_block_inputs_targets(tokens, 3, bov_token=99)
    assert x.shape == y.shape == (2, 9)
    np.testing.assert_array_equal(x[:, :3], 99)
    np.testing.assert_array_equal(x[:, 3:], tokens[:, :6])
    np.testing.assert_array_equal(y, tokens)
    with pytest.raises(ValueError, match="leave no target"):
        next_block_inputs_targets(tokens[:, :3], 3)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N\]"):
        next_block_inputs_targets(tokens[0], 3)
