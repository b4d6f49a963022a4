"""Recurrent layers: Flax-cell equivalence (LSTM, GRU), heads, bidirectional, state carry-over,
implementation passthrough, dtypes, and LayerNorm LSTM/GRU against step-by-step equations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import interpret
from jaxblocks.layers.recurrent import (
    GRU,
    LSTM,
    SLSTM,
    ElmanRNN,
    LayerNormGRU,
    LayerNormLSTM,
    flax_gru_params,
    flax_lstm_params,
)
from tests.kernels.harness import assert_close

B, T, F, H = 3, 9, 5, 16


def _x(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _randomize(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, new)


@pytest.mark.parametrize(
    "ours,cell,mapping",
    [(LSTM, nn.OptimizedLSTMCell, flax_lstm_params), (GRU, nn.GRUCell, flax_gru_params)],
)
def test_one_head_matches_flax_cell(ours, cell, mapping):
    x = _x()
    rnn = nn.RNN(cell(features=H), return_carry=True)
    fp = _randomize(rnn.init(jax.random.key(0), x))  # random biases too
    carry, want = rnn.apply(fp, x)
    layer = ours(features=H, num_heads=1)  # the default implementation (xla on CPU)
    params = {"params": {"forward": mapping(fp["params"]["cell"])}}
    got, last = layer.apply(params, x)
    assert_close(got, want, tol=1e-5)
    want_last = jnp.stack(carry[::-1]) if isinstance(carry, tuple) else carry[None]  # (c,h)->[h,c]
    assert_close(last[:, :, 0], want_last, tol=1e-5)


@pytest.mark.parametrize("cls", [LSTM, SLSTM, ElmanRNN, pytest.param(GRU, marks=pytest.mark.slow)])
def test_shapes_heads_and_final_state_carry_over(cls):
    x = _x(2)
    layer = cls(features=H, num_heads=4)
    params = layer.init(jax.random.key(0), x)
    y, last = layer.apply(params, x)
    S = {LSTM: 2, SLSTM: 4, GRU: 1, ElmanRNN: 1}[cls]
    assert y.shape == (B, T, H) and last.shape == (S, B, 4, H // 4)
    assert params["params"]["forward"]["recurrent_kernel"].value.shape[1:] == (4, 4, 4)
    # Running the second half from the first half's final state continues the sequence.
    y1, s1 = layer.apply(params, x[:, :4])
    y2, s2 = layer.apply(params, x[:, 4:], s1)
    assert_close(jnp.concatenate([y1, y2], 1), y, tol=1e-5)
    assert_close(s2, last, tol=1e-5)
    last_only, _ = cls(features=H, num_heads=4, return_sequences=False).apply(params, x)
    assert_close(last_only, y[:, -1], tol=1e-6)


def test_bidirectional_is_forward_plus_reversed_backward():
    x = _x(3)
    layer = GRU(features=H, num_heads=2, bidirectional=True)
    params = layer.init(jax.random.key(0), x)
    y, (last_f, last_b) = layer.apply(params, x)
    assert y.shape == (B, T, 2 * H)
    one = GRU(features=H, num_heads=2)
    p = params["params"]
    yf, _ = one.apply({"params": {"forward": p["forward"]}}, x)
    yb, lb = one.apply({"params": {"forward": p["backward"]}}, x[:, ::-1])
    assert_close(y[..., :H], yf, tol=1e-6)
    assert_close(y[..., H:], yb[:, ::-1], tol=1e-6)
    assert_close(last_b, lb, tol=1e-6)


def test_implementation_passthrough_and_gradients():
    x = _x(4, (2, 3, F))
    ref = ElmanRNN(features=32, num_heads=2, implementation="reference")
    params = ref.init(jax.random.key(0), x)
    params = {"params": _randomize(params["params"], seed=5)}

    def loss(impl, p):
        y, _ = ElmanRNN(features=32, num_heads=2, implementation=impl).apply(p, x)
        return jnp.sum(y**2)

    want = jax.grad(lambda p: loss("reference", p))(params)
    with interpret():
        got = jax.grad(lambda p: loss("pallas_gpu", p))(params)
    assert_close(got, want, tol=1e-4)


def test_bf16_dtype_and_errors():
    x = _x(6)
    layer = LSTM(features=H, num_heads=2, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)
    y, last = layer.apply(params, x)
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.bfloat16
    assert params["params"]["forward"]["kernel"].value.dtype == jnp.float32
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        LSTM(features=10, num_heads=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must be \[B, T, F\]"):
        LSTM(features=H).init(jax.random.key(0), x[0])


# --- LayerNorm LSTM / GRU ----------------------------------------------------------------------


def _ln(v, eps=1e-5):
    v = np.asarray(v, np.float64)
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps)


def _sig(v):
    return 1 / (1 + np.exp(-v))


def test_layer_norm_lstm_matches_equations():
    x = _x(7)
    layer = LayerNormLSTM(features=H)
    p = _randomize(nn.meta.unbox(layer.init(jax.random.key(0), x))["params"], seed=8)
    y, last = layer.apply({"params": p}, x)
    q = {k: np.asarray(v, np.float64) for k, v in p.items()}
    h, c = np.zeros((B, H)), np.zeros((B, H))
    xs = np.asarray(x, np.float64)
    for t in range(T):  # Ba et al. eq. 20-22, in float64
        g = (
            _ln(h @ q["recurrent_kernel"]) * q["ln_h_scale"]
            + q["ln_h_bias"]
            + _ln(xs[:, t] @ q["kernel"]) * q["ln_x_scale"]
            + q["ln_x_bias"]
            + q["bias"]
        )
        i, f, z, o = np.split(g, 4, axis=-1)
        c = _sig(f) * c + _sig(i) * np.tanh(z)
        h = _sig(o) * np.tanh(_ln(c) * q["ln_c_scale"] + q["ln_c_bias"])
        np.testing.assert_allclose(y[:, t], h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last, np.stack([h, c]), rtol=1e-4, atol=1e-5)


def test_layer_norm_gru_matches_equations():
    x = _x(9)
    layer = LayerNormGRU(features=H)
    p = _randomize(nn.meta.unbox(layer.init(jax.random.key(0), x))["params"], seed=10)
    y, last = layer.apply({"params": p}, x)
    q = {k: np.asarray(v, np.float64) for k, v in p.items()}
    h = np.zeros((B, H))
    xs = np.asarray(x, np.float64)
    for t in range(T):
        xw, rh = xs[:, t] @ q["kernel"], h @ q["recurrent_kernel"]
        sx, bx, sh, bh = q["ln_x_scale"], q["ln_x_bias"], q["ln_h_scale"], q["ln_h_bias"]
        xrz = _ln(xw[:, : 2 * H]) * sx[: 2 * H] + bx[: 2 * H]
        xn = _ln(xw[:, 2 * H :]) * sx[2 * H :] + bx[2 * H :]
        hrz = _ln(rh[:, : 2 * H]) * sh[: 2 * H] + bh[: 2 * H]
        hn = _ln(rh[:, 2 * H :]) * sh[2 * H :] + bh[2 * H :]
        r = _sig(hrz[:, :H] + xrz[:, :H] + q["bias"][:H])
        z = _sig(hrz[:, H:] + xrz[:, H:] + q["bias"][H : 2 * H])
        n = np.tanh(xn + q["bias"][2 * H :] + r * hn)
        h = z * h + (1 - z) * n
        np.testing.assert_allclose(y[:, t], h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(last[0], h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [LayerNormLSTM, pytest.param(LayerNormGRU, marks=pytest.mark.slow)])
def test_layer_norm_rnn_is_invariant_to_weight_scale(cls):
    """LayerNorm makes the layer invariant to rescaling the input and recurrent weights."""
    x = _x(11)
    layer = cls(features=H, return_sequences=False)
    p = _randomize(nn.meta.unbox(layer.init(jax.random.key(0), x))["params"], seed=12)
    y, _ = layer.apply({"params": p}, x)
    scaled = dict(p, kernel=p["kernel"] * 7.0, recurrent_kernel=p["recurrent_kernel"] * 0.2)
    y2, _ = layer.apply({"params": scaled}, x)
    assert y.shape == (B, H)
    assert_close(y2, y, tol=1e-3)
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0]))(p)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g))


def test_bidirectional_initial_states_pair_and_errors():
    x = _x(7)
    layer = LSTM(features=H, num_heads=2, bidirectional=True)
    params = layer.init(jax.random.key(0), x)
    s_f = jax.random.normal(jax.random.key(1), (2, B, 2, H // 2))
    s_b = jax.random.normal(jax.random.key(2), (2, B, 2, H // 2))
    y, (last_f, last_b) = layer.apply(params, x, (s_f, s_b))
    one = LSTM(features=H, num_heads=2)
    p = params["params"]
    yf, lf = one.apply({"params": {"forward": p["forward"]}}, x, s_f)
    yb, lb = one.apply({"params": {"forward": p["backward"]}}, x[:, ::-1], s_b)
    assert_close(y, jnp.concatenate([yf, yb[:, ::-1]], -1), tol=1e-6)
    assert_close((last_f, last_b), (lf, lb), tol=1e-6)
    y_none_f, _ = layer.apply(params, x, (None, s_b))  # either side may be None (zeros)
    assert_close(y_none_f[..., H:], y[..., H:], tol=1e-6)
    # One array where a pair is expected: the message names what was passed, not a slice of it.
    with pytest.raises(ValueError, match=r"initial_states must be None or a \(forward, backward"):
        layer.apply(params, x, s_f)
    with pytest.raises(ValueError, match=r"initial_states\[0\] \(forward\) must have shape"):
        layer.apply(params, x, (s_f[:1], s_b))


# --- torch.nn.LSTM / GRU / RNN on the same weights (forward and every gradient) ---------------


def _torch_to_ours(w: dict, function: str, H: int, *, grads: bool = False) -> dict:
    """torch.nn.{LSTM, GRU, RNN} arrays of one layer (``weight_ih, weight_hh, bias_ih,
    bias_hh``) -> our ``num_heads=1`` layer params, or with ``grads`` their gradients -> ours.

    torch stacks its gates as rows: LSTM (i, f, g, o) = our (i, f, z, o); GRU (r, z, n), where
    ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))`` is our recurrent gate g with bias b_g = b_hn.
    Our bias is ``b_ih + b_hh`` where torch has both, so its gradient is ``b_ih``'s.
    """
    w_ih, w_hh, b_ih, b_hh = (w[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    G = w_ih.shape[0] // H
    rows = lambda a, g: a[g * H : (g + 1) * H]
    both = (lambda g: rows(b_ih, g)) if grads else (lambda g: rows(b_ih, g) + rows(b_hh, g))
    kernel = np.stack([rows(w_ih, g).T for g in range(G)], 1)[:, :, None]  # [F, G, 1, H]
    if function == "gru":  # recurrent (g, r, z) = torch (n, r, z); biases (g, r, z, n)
        recurrent = np.stack([rows(w_hh, g).T for g in (2, 0, 1)])
        bias = np.stack([rows(b_hh, 2), both(0), both(1), rows(b_ih, 2)])
    else:
        recurrent = np.stack([rows(w_hh, g).T for g in range(G)])
        bias = np.stack([both(g) for g in range(G)])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return {
        "kernel": f32(kernel),
        "recurrent_kernel": f32(recurrent[:, None]),
        "bias": f32(bias[:, None]),
    }


@pytest.mark.torch
@pytest.mark.parametrize("cls,function", [(LSTM, "lstm"), (GRU, "gru"), (ElmanRNN, "elman")])
def test_matches_torch_nn_forward_and_gradients(cls, function):
    """The default implementation (xla on CPU, a hand-written custom_vjp) against torch.nn in
    float64: outputs, the last hidden state, and the gradients of x and of every weight."""
    torch = pytest.importorskip("torch")
    Bt, Tt, Ft, Ht = 3, 37, 5, 24
    torch.manual_seed(0)
    tmod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[function](
        Ft, Ht, batch_first=True
    ).double()
    x, ct_y, ct_h = (np.asarray(_x(k, shape)) for k, shape in
                     ((3, (Bt, Tt, Ft)), (4, (Bt, Tt, Ht)), (5, (Bt, Ht))))  # fmt: skip

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y_t, carry = tmod(xt)
    h_t = (carry[0] if function == "lstm" else carry)[0]
    ((y_t * torch.tensor(ct_y)).sum() + (h_t * torch.tensor(ct_h)).sum()).backward()
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    weights = {n: getattr(tmod, f"{n}_l0").detach().numpy() for n in names}
    want_grads = _torch_to_ours(
        {n: getattr(tmod, f"{n}_l0").grad.numpy() for n in names}, function, Ht, grads=True
    )

    layer = cls(features=Ht, num_heads=1)

    def loss(p, x):
        y, last = layer.apply({"params": {"forward": p}}, x)
        return jnp.sum(y * ct_y) + jnp.sum(last[0, :, 0] * ct_h), (y, last)

    (_, (y, last)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        _torch_to_ours(weights, function, Ht), jnp.asarray(x)
    )
    as32 = lambda t: jnp.asarray(t.detach().numpy(), jnp.float32)
    assert_close(y, as32(y_t), tol=1e-5, name="y")
    assert_close(last[0, :, 0], as32(h_t), tol=1e-5, name="h_T")
    assert_close(gx, as32(xt.grad), tol=1e-5, name="dx")
    for name in ("kernel", "recurrent_kernel", "bias"):
        assert_close(gp[name], want_grads[name], tol=1e-5, name=f"d{name}")
