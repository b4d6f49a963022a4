"""Bad inputs to the sequence ops and layers: one table, each row (callable, expected exception,
regex the message must match). GLA ops, `GatedLinearAttention`, `GLABlock`, the FlashRNN layers
and the `flashrnn` op: mismatched shapes, wrong ranks, wrong dtypes (ints where floats are
needed), empty batches, wrong types for booleans, strings and numbers, bad ``cu_seqlens`` and
explicit Pallas implementations on CPU. Empty sequences and non-finite values are not errors:
what each op does with them is tested below the table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.gla import GLABlock
from jaxblocks.kernels import UnsupportedImplementationError
from jaxblocks.kernels.gla import chunk_gla, fused_recurrent_gla
from jaxblocks.kernels.rnn.api import flashrnn
from jaxblocks.layers.linear_attention import GatedLinearAttention
from jaxblocks.layers.recurrent import GRU, LSTM, SLSTM, ElmanRNN, FlashRNN, LayerNormLSTM

KEY = jax.random.key(0)
B, T, H, K, V = 2, 8, 2, 16, 8


def _normal(seed, shape, dtype=jnp.float32):
    # NumPy draws: these module-level inputs would otherwise compile at collection.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


q = k = _normal(1, (B, T, H, K))
v = _normal(2, (B, T, H, V))
g = jax.nn.log_sigmoid(_normal(3, (B, T, H, K)))
h0 = _normal(4, (B, H, K, V))
q1, k1, v1, g1 = (x[:1] for x in (q, k, v, g))  # B = 1, for cu_seqlens
x = _normal(5, (B, T, 32))  # layer inputs [B, T, D]
Wx = _normal(6, (B, T, 4, 2, 8))  # flashrnn lstm inputs [B, T, G, N, D]
R = 0.3 * _normal(7, (4, 2, 8, 8))
bias = jnp.zeros((4, 2, 8))


def _init(layer, inp, *args):
    return lambda: layer.init(KEY, inp, *args)


def _apply_with_states(layer, states):
    def run():
        params = layer.init(KEY, x)
        return layer.apply(params, x, states)

    return run


def _lstm_states(S=2, Bs=B, N=2, D=8):
    return jnp.zeros((S, Bs, N, D))


P = functools.partial
CASES = [
    # --- chunk_gla / fused_recurrent_gla ---------------------------------------------------------
    ("gla_k_shape", P(chunk_gla, q, k[:, :4], v, g), ValueError, r"chunk_gla: k must have shape"),
    ("gla_g_rank", P(chunk_gla, q, k, v, g[..., 0]), ValueError, r"chunk_gla: g must have shape"),
    ("gla_q_rank", P(chunk_gla, q[0], k, v, g), ValueError, r"q must have rank 4, got shape"),
    ("gla_v_heads", P(chunk_gla, q, k, v[:, :, :1], g), ValueError, r"v must have shape"),
    (
        "gla_int_q",
        P(chunk_gla, q.astype(jnp.int32), k, v, g),
        TypeError,
        r"chunk_gla: q must have dtype in \[.*float32.*\], got shape \(2, 8, 2, 16\) dtype int32",
    ),
    ("gla_q_list", P(chunk_gla, [1.0], k, v, g), TypeError, r"q must be an array, got list"),
    (
        "gla_empty_batch",
        P(chunk_gla, q[:0], k[:0], v[:0], g[:0]),
        ValueError,
        r"B, H, K and V must be positive",
    ),
    (
        "gla_h0_dtype",
        P(chunk_gla, q, k, v, g, initial_state=h0.astype(jnp.bfloat16)),
        TypeError,
        r"initial_state must have dtype",
    ),
    (
        "gla_h0_shape",
        P(chunk_gla, q, k, v, g, initial_state=h0[:1]),
        ValueError,
        r"initial_state must have shape \(2, 2, 16, 8\), got shape \(1, 2, 16, 8\)",
    ),
    (
        "gla_seg_float",
        P(chunk_gla, q, k, v, g, segment_ids=jnp.zeros((B, T))),
        TypeError,
        r"segment_ids must have dtype",
    ),
    (
        "gla_seg_shape",
        P(chunk_gla, q, k, v, g, segment_ids=jnp.zeros((B, T - 1), jnp.int32)),
        ValueError,
        r"segment_ids must have shape",
    ),
    ("gla_scale_str", P(chunk_gla, q, k, v, g, scale="abc"), TypeError, r"scale must be None or"),
    ("gla_scale_nan", P(chunk_gla, q, k, v, g, scale=np.nan), ValueError, r"scale must be finite"),
    (
        "gla_flag_str",
        P(chunk_gla, q, k, v, g, output_final_state="no"),
        TypeError,
        r"chunk_gla: output_final_state must be a bool, got str 'no'",
    ),
    (
        "gla_chunk_float",
        P(chunk_gla, q, k, v, g, chunk_size=64.0),
        TypeError,
        r"chunk_size must be an int",
    ),
    ("gla_chunk_48", P(chunk_gla, q, k, v, g, chunk_size=48), ValueError, r"chunk_size must be"),
    (
        "gla_impl_int",
        P(chunk_gla, q, k, v, g, implementation=1),
        TypeError,
        r"implementation must be None or a str, got int 1",
    ),
    (
        "gla_impl_unknown",
        P(chunk_gla, q, k, v, g, implementation="cuda"),
        UnsupportedImplementationError,
        r"chunk_gla: implementation='cuda' is not known",
    ),
    (
        "gla_pallas_gpu_on_cpu",
        P(chunk_gla, q, k, v, g, implementation="pallas_gpu"),
        UnsupportedImplementationError,
        r"chunk_gla: implementation='pallas_gpu' .*cannot run on platform 'cpu'.*interpret\(\)",
    ),
    (
        "gla_pallas_tpu_on_cpu",
        P(chunk_gla, q, k, v, g, implementation="pallas_tpu"),
        UnsupportedImplementationError,
        r"chunk_gla: implementation='pallas_tpu' .*cannot run on platform 'cpu'.*interpret\(\)",
    ),
    (
        "gla_block_sizes_dict",
        P(chunk_gla, q, k, v, g, block_sizes={"block_v": 16}),
        TypeError,
        r"block_sizes must be None or a .*BlockSizes, got dict",
    ),
    (
        "gla_cu_and_seg",
        P(chunk_gla, q1, k1, v1, g1, segment_ids=jnp.zeros((1, T), jnp.int32), cu_seqlens=[0, T]),
        ValueError,
        r"pass segment_ids or cu_seqlens, not both",
    ),
    (
        "gla_cu_batch",
        P(chunk_gla, q, k, v, g, cu_seqlens=jnp.array([0, T])),
        ValueError,
        r"cu_seqlens requires batch size B == 1",
    ),
    (
        "gla_cu_float",
        P(chunk_gla, q1, k1, v1, g1, cu_seqlens=jnp.array([0.0, T])),
        TypeError,
        r"cu_seqlens must have dtype",
    ),
    (
        "gla_cu_start",
        P(chunk_gla, q1, k1, v1, g1, cu_seqlens=np.array([2, 5, T])),
        ValueError,
        r"cu_seqlens must start at 0, got cu_seqlens\[0\]=2 in \[2, 5, 8\]",
    ),
    (
        "gla_cu_decreasing",
        P(chunk_gla, q1, k1, v1, g1, cu_seqlens=jnp.array([0, 6, 3, T])),
        ValueError,
        r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\]=6 > cu_seqlens\[2\]=3",
    ),
    (
        "gla_cu_end",
        P(chunk_gla, q1, k1, v1, g1, cu_seqlens=np.array([0, 3, 5])),
        ValueError,
        r"cu_seqlens must end at T=8 \(the length of q\), got cu_seqlens\[-1\]=5",
    ),
    (
        "gla_cu_h0_shape",
        P(chunk_gla, q1, k1, v1, g1, cu_seqlens=np.array([0, 3, T]), initial_state=h0[:1]),
        ValueError,
        r"initial_state must have shape \(2, 2, 16, 8\)",
    ),
    (
        "recurrent_scale_list",
        P(fused_recurrent_gla, q, k, v, g, scale=[1.0]),
        TypeError,
        r"fused_recurrent_gla: scale must be None or a real number, got list",
    ),
    (
        "recurrent_flag_int",
        P(fused_recurrent_gla, q, k, v, g, output_final_state=1),
        TypeError,
        r"fused_recurrent_gla: output_final_state must be a bool, got int 1",
    ),
    (
        "recurrent_h0_shape",
        P(fused_recurrent_gla, q, k, v, g, initial_state=h0[:, :1]),
        ValueError,
        r"fused_recurrent_gla: initial_state must have shape",
    ),
    (
        "recurrent_int_g",
        P(fused_recurrent_gla, q, k, v, g.astype(jnp.int32)),
        TypeError,
        r"fused_recurrent_gla: g must have dtype",
    ),
    # --- GatedLinearAttention / GLABlock ---------------------------------------------------------
    (
        "gla_layer_rank2",
        _init(GatedLinearAttention(num_heads=2), x[0]),
        ValueError,
        r"GatedLinearAttention: x must be \[B, T, D\] \(rank 3\), got shape \(8, 32\) "
        r"dtype float32",
    ),
    (
        "gla_layer_rank4",
        _init(GatedLinearAttention(num_heads=2), x[None]),
        ValueError,
        r"GatedLinearAttention: x must be \[B, T, D\] \(rank 3\), got shape \(1, 2, 8, 32\)",
    ),
    (
        "gla_layer_int",
        _init(GatedLinearAttention(num_heads=2), x.astype(jnp.int32)),
        TypeError,
        r"GatedLinearAttention: x must be a float array \[B, T, D\] .*dtype int32",
    ),
    (
        "gla_layer_list",
        _init(GatedLinearAttention(num_heads=2), [[1.0]]),
        TypeError,
        r"GatedLinearAttention: x must be a float array \[B, T, D\], got list",
    ),
    (
        "gla_layer_empty_batch",
        _init(GatedLinearAttention(num_heads=2), x[:0]),
        ValueError,
        r"GatedLinearAttention: x must be \[B, T, D\] with B >= 1 and D >= 1, got shape "
        r"\(0, 8, 32\)",
    ),
    (
        "gla_layer_heads",
        _init(GatedLinearAttention(num_heads=3), x),
        ValueError,
        r"key_dim 16 and value_dim 32 must be positive and divisible by num_heads 3",
    ),
    (
        "gla_layer_zero_heads",
        _init(GatedLinearAttention(num_heads=0), x),
        ValueError,
        r"GatedLinearAttention: num_heads must be a positive int, got 0",
    ),
    (
        "gla_layer_key_dim_zero",
        _init(GatedLinearAttention(num_heads=2, expand_k=0.01), x),
        ValueError,
        r"key_dim 0 and value_dim 32 must be positive",
    ),
    (
        "gla_layer_decode_str",
        _init(GatedLinearAttention(num_heads=2, decode="no"), x),
        TypeError,
        r"GatedLinearAttention: decode must be a bool, got str 'no'",
    ),
    (
        "gla_layer_conv_int",
        _init(GatedLinearAttention(num_heads=2, use_short_conv=1), x),
        TypeError,
        r"use_short_conv must be a bool, got int 1",
    ),
    (
        "gla_layer_pallas_tpu",
        _init(GatedLinearAttention(num_heads=2, implementation="pallas_tpu"), x),
        UnsupportedImplementationError,
        r"chunk_gla: implementation='pallas_tpu' .*cannot run on platform 'cpu'",
    ),
    (
        "gla_block_rank2",
        _init(GLABlock(num_heads=2, mlp_hidden_size=32), x[0]),
        ValueError,
        r"GLABlock: x must be \[B, T, D\] \(rank 3\), got shape \(8, 32\)",
    ),
    (
        "gla_block_int",
        _init(GLABlock(num_heads=2, mlp_hidden_size=32), x.astype(jnp.int32)),
        TypeError,
        r"GLABlock: x must be a float array",
    ),
    (
        "gla_block_decode_str",
        _init(GLABlock(num_heads=2, mlp_hidden_size=32, decode="yes"), x),
        TypeError,
        r"GLABlock: decode must be a bool, got str 'yes'",
    ),
    # --- FlashRNN layers ------------------------------------------------------------------------
    (
        "lstm_rank2",
        _init(LSTM(features=16), x[0]),
        ValueError,
        r"LSTM: x must be \[B, T, F\] \(rank 3\), got shape \(8, 32\) dtype float32",
    ),
    (
        "gru_int",
        _init(GRU(features=16), x.astype(jnp.int32)),
        TypeError,
        r"GRU: x must be a float array \[B, T, F\] .*dtype int32",
    ),
    (
        "slstm_empty_batch",
        _init(SLSTM(features=16), x[:0]),
        ValueError,
        r"SLSTM: x must be \[B, T, F\] with B >= 1 and F >= 1, got shape \(0, 8, 32\)",
    ),
    (
        "elman_list",
        _init(ElmanRNN(features=16), [[[1.0]]]),
        TypeError,
        r"ElmanRNN: x must be a float array \[B, T, F\], got list",
    ),
    (
        "lstm_heads",
        _init(LSTM(features=10, num_heads=4), x),
        ValueError,
        r"LSTM: features=10 is not divisible by num_heads=4",
    ),
    (
        "lstm_zero_heads",
        _init(LSTM(features=16, num_heads=0), x),
        ValueError,
        r"LSTM: num_heads must be a positive int, got int 0",
    ),
    (
        "gru_float_features",
        _init(GRU(features=16.0), x),
        ValueError,
        r"GRU: features must be a positive int, got float 16.0",
    ),
    (
        "lstm_return_sequences_str",
        _init(LSTM(features=16, return_sequences="no"), x),
        TypeError,
        r"LSTM: return_sequences must be a bool, got str 'no'",
    ),
    (
        "lstm_bidirectional_int",
        _init(LSTM(features=16, bidirectional=1), x),
        TypeError,
        r"LSTM: bidirectional must be a bool, got int 1",
    ),
    (
        "flashrnn_layer_function",
        _init(FlashRNN(features=16, function="lsmt"), x),
        ValueError,
        r"FlashRNN: function must be one of \['lstm', 'slstm', 'gru', 'elman'\], got 'lsmt'",
    ),
    (
        "flashrnn_layer_impl_int",
        _init(FlashRNN(features=16, implementation=0), x),
        TypeError,
        r"FlashRNN: implementation must be None or a str, got int 0",
    ),
    (
        "lstm_pallas_gpu_on_cpu",
        _init(LSTM(features=16, implementation="pallas_gpu"), x),
        UnsupportedImplementationError,
        r"flashrnn: implementation='pallas_gpu' .*cannot run on platform 'cpu'",
    ),
    (
        "lstm_states_shape",
        _apply_with_states(LSTM(features=16, num_heads=2), _lstm_states(Bs=3)),
        ValueError,
        r"LSTM: initial_states must have shape \[S, B, N, D\] = \(2, 2, 2, 8\), got shape "
        r"\(2, 3, 2, 8\)",
    ),
    (
        "lstm_states_int",
        _apply_with_states(LSTM(features=16, num_heads=2), _lstm_states().astype(jnp.int32)),
        TypeError,
        r"LSTM: initial_states must be a float array, got shape \(2, 2, 2, 8\) dtype int32",
    ),
    (
        "lstm_states_pair_unidirectional",
        _apply_with_states(LSTM(features=16, num_heads=2), (_lstm_states(), _lstm_states())),
        TypeError,
        r"LSTM: initial_states must be None or one array .*bidirectional=True.*tuple of 2",
    ),
    (
        "bilstm_states_one_array",
        _apply_with_states(LSTM(features=16, num_heads=2, bidirectional=True), _lstm_states()),
        ValueError,
        r"LSTM: with bidirectional=True, initial_states must be None or a \(forward, backward\) "
        r"pair, each None or \[S, B, N, D\] = \(2, 2, 2, 8\), got one array of shape "
        r"\(2, 2, 2, 8\)",
    ),
    (
        "bilstm_states_backward_shape",
        _apply_with_states(
            LSTM(features=16, num_heads=2, bidirectional=True), (None, _lstm_states()[0])
        ),
        ValueError,
        r"LSTM: initial_states\[1\] \(backward\) must have shape \[S, B, N, D\] = \(2, 2, 2, 8\), "
        r"got shape \(2, 2, 8\)",
    ),
    (
        "layer_norm_lstm_states",
        _apply_with_states(LayerNormLSTM(features=16), jnp.zeros((1, B, 16))),
        ValueError,
        r"LayerNormLSTM: initial_states must have shape \[S, B, H\] = \(2, 2, 16\)",
    ),
    # --- flashrnn ------------------------------------------------------------------------------
    ("flashrnn_rank", P(flashrnn, Wx[:, 0], R, bias), ValueError, r"flashrnn: Wx must have rank 5"),
    (
        "flashrnn_int",
        P(flashrnn, Wx.astype(jnp.int32), R, bias),
        TypeError,
        r"flashrnn: Wx must have dtype",
    ),
    (
        "flashrnn_gates",
        P(flashrnn, Wx[:, :, :3], R, bias),
        ValueError,
        r"flashrnn: Wx \[B, T, G, N, D\] must have G=4 gate inputs for function='lstm'",
    ),
    ("flashrnn_R", P(flashrnn, Wx, R[:3], bias), ValueError, r"flashrnn: R must have shape"),
    ("flashrnn_b", P(flashrnn, Wx, R, bias[:, :1]), ValueError, r"flashrnn: b must have shape"),
    (
        "flashrnn_states",
        P(flashrnn, Wx, R, bias, jnp.zeros((1, B, 2, 8))),
        ValueError,
        r"flashrnn: states must have shape \(2, 2, 2, 8\)",
    ),
    (
        "flashrnn_empty_batch",
        P(flashrnn, Wx[:0], R, bias),
        ValueError,
        r"flashrnn: Wx must have non-empty B, N, D",
    ),
    (
        "flashrnn_function",
        P(flashrnn, Wx, R, bias, function="LSTM"),
        ValueError,
        r"flashrnn: function must be one of \['lstm', 'slstm', 'gru', 'elman'\], got 'LSTM'",
    ),
    (
        "flashrnn_function_type",
        P(flashrnn, Wx, R, bias, function=4),
        TypeError,
        r"flashrnn: function must be one of .*, got int 4",
    ),
    (
        "flashrnn_impl_list",
        P(flashrnn, Wx, R, bias, implementation=["xla"]),
        TypeError,
        r"flashrnn: implementation must be None or a str, got list",
    ),
    (
        "flashrnn_pallas_tpu_on_cpu",
        P(flashrnn, Wx, R, bias, implementation="pallas_tpu"),
        UnsupportedImplementationError,
        r"flashrnn: implementation='pallas_tpu' .*cannot run on platform 'cpu'.*interpret\(\)",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_case_names_are_unique():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------------------------------------
# Empty sequences (T = 0) are not errors.


@pytest.mark.parametrize(
    "layer",
    [GatedLinearAttention(num_heads=2), GLABlock(num_heads=2, mlp_hidden_size=32)],
    ids=lambda m: type(m).__name__,
)
def test_gla_layers_empty_sequence_is_an_empty_output(layer):
    y, params = layer.init_with_output(KEY, x[:, :0])
    assert y.shape == (B, 0, 32)
    # The same parameters as for a non-empty input.
    full = layer.init(KEY, x)
    assert jax.tree.structure(params) == jax.tree.structure(full)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, full)


def test_gla_decode_empty_step_leaves_the_cache():
    layer = GatedLinearAttention(num_heads=2, decode=True, use_short_conv=True)
    variables = layer.init(KEY, x)
    params = {"params": variables["params"]}
    _, cache = layer.apply({**params, "cache": variables["cache"]}, x, mutable=["cache"])
    y, new = layer.apply({**params, **cache}, x[:, :0], mutable=["cache"])
    assert y.shape == (B, 0, 32)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", [LSTM, GRU, SLSTM, ElmanRNN, LayerNormLSTM])
def test_recurrent_empty_sequence_returns_the_initial_states(cls):
    layer = cls(features=16)
    params = layer.init(KEY, x)
    y, last = layer.apply(params, x[:, :0])
    assert y.shape == (B, 0, 16)
    np.testing.assert_array_equal(last, jnp.zeros_like(last))
    y_last, _ = cls(features=16, return_sequences=False).apply(params, x[:, :0])
    np.testing.assert_array_equal(y_last, jnp.zeros((B, 16)))  # the initial h


def test_ops_empty_sequence():
    o, final = chunk_gla(q[:, :0], k[:, :0], v[:, :0], g[:, :0], initial_state=h0,
                         output_final_state=True)  # fmt: skip
    assert o.shape == (B, 0, H, V)
    np.testing.assert_array_equal(final, h0)
    states_all, last = flashrnn(Wx[:, :0], R, bias, _lstm_states() + 1.0)
    assert states_all.shape == (2, B, 0, 2, 8)
    np.testing.assert_array_equal(last, _lstm_states() + 1.0)


# ---------------------------------------------------------------------------------------------
# Non-finite values: what each op does with them (documented in their docstrings).


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_gla_nan_stays_in_its_row_and_head(impl):
    vv = v.at[0, 5, 1].set(jnp.nan)  # row 0, position 5, head 1
    o, final = chunk_gla(q, k, vv, g, initial_state=h0, output_final_state=True,
                         implementation=impl)  # fmt: skip
    assert np.all(np.isnan(o[0, 5:, 1])) and np.all(np.isnan(final[0, 1]))
    assert np.all(np.isfinite(o[1])) and np.all(np.isfinite(o[0, :, 0]))
    assert np.all(np.isfinite(final[1])) and np.all(np.isfinite(final[0, 0]))
    if impl == "reference":  # the token loop keeps earlier positions finite
        assert np.all(np.isfinite(o[0, :5]))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_gla_minus_inf_gate_is_a_reset_and_plus_inf_overflows(impl):
    gg = g.at[0, 4].set(-jnp.inf)  # every head and channel of row 0 at position 4
    o, final = chunk_gla(q, k, v, gg, initial_state=h0, output_final_state=True,
                         implementation=impl)  # fmt: skip
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(final))
    # After the reset row 0 does not depend on what came before.
    o2, _ = chunk_gla(q, k.at[0, :4].set(9.0), v.at[0, :4].set(-9.0), gg, initial_state=h0 * 3,
                      implementation=impl)  # fmt: skip
    np.testing.assert_allclose(o2[0, 4:], o[0, 4:], rtol=1e-5, atol=1e-6)
    o, _ = chunk_gla(q, k, v, g.at[0, 4, 0, 0].set(jnp.inf), implementation=impl)
    assert not np.all(np.isfinite(o[0, 4:, 0])) and np.all(np.isfinite(o[1]))
    o, _ = fused_recurrent_gla(q, k, v, gg, implementation=impl)
    assert np.all(np.isfinite(o))


def test_gla_layer_nan_stays_in_its_row():
    layer = GatedLinearAttention(num_heads=2, chunk_size=16)
    xx = _normal(8, (B, 40, 32))
    params = layer.init(KEY, xx)
    y = layer.apply(params, xx.at[0, 20].set(jnp.nan))
    assert np.all(np.isnan(y[0, 20:])) and np.all(np.isfinite(y[1]))
    assert np.all(np.isfinite(y[0, :16]))  # earlier chunks are untouched
    y = layer.apply(params, xx.at[0, 20, 3].set(jnp.inf))
    assert np.all(np.isfinite(y[1]))


@pytest.mark.parametrize("cls", [LSTM, GRU, ElmanRNN])
def test_recurrent_nan_stays_in_its_row(cls):
    layer = cls(features=16, num_heads=2)
    params = layer.init(KEY, x)
    y, last = layer.apply(params, x.at[0, 3, 0].set(jnp.nan))
    assert np.all(np.isnan(y[0, 3:])) and np.all(np.isfinite(y[0, :3]))  # every head after t
    assert np.all(np.isfinite(y[1])) and np.all(np.isfinite(last[:, 1]))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_flashrnn_nan_stays_in_its_row_and_head(impl):
    states_all, last = flashrnn(Wx.at[0, 2, 0, 1, 0].set(jnp.nan), R, bias, implementation=impl)
    h = states_all[0]  # [B, T, N, D]
    assert np.all(np.isnan(h[0, 2:, 1]).any(axis=-1)) and np.all(np.isfinite(h[0, :2]))
    assert np.all(np.isfinite(h[0, :, 0])) and np.all(np.isfinite(h[1]))
    assert np.all(np.isfinite(last[:, 1])) and np.all(np.isfinite(last[:, 0, 0]))
