"""TCN and TCNCA: receptive field, causality, chunk locality, the MEGA-style layer against an
independent NumPy forward, dtypes, errors, and the TCNCA length benchmark (tiny sizes)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.tcn import (
    TCN,
    TCNCA,
    CausalDepthwiseConv,
    chunked_attention,
    simple_relative_position_bias,
    tcn_receptive_field,
)


def _input_grad(model, params, x, t):
    """|d y[:, t] / d x| summed over batch/channels: which inputs output t depends on."""
    g = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(params, x)[:, t])))(x)
    return np.abs(np.asarray(g, np.float32)).sum(axis=(0, 2))


@pytest.mark.parametrize("kernel_size,levels,depthwise", [(3, 3, False), (2, 4, True)])
def test_tcn_receptive_field_and_causality(kernel_size, levels, depthwise):
    T, C = 64, 4
    x = jax.random.normal(jax.random.key(0), (2, T, C))
    tcn = TCN(features=C, kernel_size=kernel_size, num_levels=levels, depthwise=depthwise)
    # The structure, not one draw of ReLU masks: positive inputs, weights and biases keep every
    # ReLU open (the network is then linear), and |weights| ~ 0.5 instead of N(0, 0.01) keep
    # far-lag products from underflowing.
    x = jnp.abs(x)
    params = jax.tree.map(
        lambda p: jnp.abs(p) * 50.0 + 0.1, jax.jit(tcn.init)(jax.random.key(1), x)
    )
    rf = tcn_receptive_field(kernel_size, levels)
    assert tcn.receptive_field == rf == 1 + 2 * (kernel_size - 1) * (2**levels - 1)
    t = T - 1
    dep = _input_grad(tcn, params, x, t) > 0
    assert not dep[t + 1 :].any()  # causal (vacuous at the end; checked below mid-sequence)
    assert dep[t - rf + 1 : t + 1].all()
    assert dep[t - rf + 1] and dep[t]  # the field's two ends are reached
    assert not dep[: t - rf + 1].any()  # nothing beyond the receptive field
    mid = 30
    dep_mid = _input_grad(tcn, params, x, mid) > 0
    assert not dep_mid[mid + 1 :].any()


def test_tcn_future_inputs_do_not_change_the_past():
    x = jax.random.normal(jax.random.key(0), (2, 40, 3))
    tcn = TCN(features=(8, 8, 5), kernel_size=3)
    params = jax.jit(tcn.init)(jax.random.key(1), x)
    y = tcn.apply(params, x)
    y2 = tcn.apply(params, x.at[:, 25:].set(3.0))
    assert y.shape == (2, 40, 5)
    np.testing.assert_array_equal(y[:, :25], y2[:, :25])
    assert not np.allclose(y[:, 25:], y2[:, 25:])


def test_causal_depthwise_conv_equals_flax_grouped_conv():
    x = jax.random.normal(jax.random.key(0), (2, 19, 5))
    ours = CausalDepthwiseConv(kernel_size=3, dilation=4)
    params = jax.jit(ours.init)(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)
    ref = nn.Conv(5, (3,), kernel_dilation=(4,), padding=((8, 0),), feature_group_count=5)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-6)


def test_chunked_attention_matches_masked_full_attention():
    B, T, Z, c = 2, 10, 4, 4
    q, k, v = (jax.random.normal(kk, (B, T, Z)) for kk in jax.random.split(jax.random.key(0), 3))
    o = chunked_attention(q, k, v, c, causal=True)
    s = jnp.einsum("bqz,bkz->bqk", q, k) / 2.0
    i = jnp.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] // c == i[:, None] // c)
    want = jnp.einsum("bqk,bkv->bqv", jax.nn.softmax(jnp.where(mask[None], s, -jnp.inf), -1), v)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)
    o2 = chunked_attention(q, k, v, c, causal=False)  # padded keys masked (T=10, chunk 4)
    mask2 = i[None, :] // c == i[:, None] // c
    want2 = jnp.einsum("bqk,bkv->bqv", jax.nn.softmax(jnp.where(mask2[None], s, -jnp.inf), -1), v)
    np.testing.assert_allclose(o2, want2, rtol=1e-5, atol=1e-6)


# ---- TCNCA against an independent NumPy formulation of the MEGA-style layer ------------------


def _np_layernorm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_causal_depthwise(x, p, dilation):
    """y[t, c] = b[c] + Σ_i w[i, c] · x[t − (k − 1 − i)·d, c] (zero before the start)."""
    w, b = np.asarray(p["kernel"])[:, 0, :], np.asarray(p["bias"])  # [k, C], [C]
    k = w.shape[0]
    y = np.tile(b, (x.shape[0], 1)).astype(np.float64)
    for t in range(x.shape[0]):
        for i in range(k):
            s = t - (k - 1 - i) * dilation
            if s >= 0:
                y[t] += w[i] * x[s]
    return y


def _np_tcn(x, p, levels):
    relu = lambda a: np.maximum(a, 0.0)
    for lvl in range(levels):
        q = p[f"level{lvl}"]
        h = relu(_np_causal_depthwise(x, q["conv1"], 2**lvl))
        h = _np_causal_depthwise(h, q["conv2"], 2**lvl)
        last = lvl == levels - 1
        x = h + x if last else relu(relu(h) + x)  # the last level is linear (signed output)
    return x


def _np_mega_rel_bias(table, n):
    """MEGA's SimpleRelativePositionalBias.forward re-done step by step: slice, pad, tile, view."""
    M = (len(table) + 1) // 2
    b = table[M - n : M + n - 1]  # 2n − 1 offsets
    t = np.concatenate([b, np.zeros(n)])  # 3n − 1
    t = np.tile(t, n)[:-n].reshape(n, 3 * n - 2)
    r = (2 * n - 1) // 2
    return t[:, r : t.shape[1] - r]


def _np_tcnca(x, params, *, z, v, chunk, levels, causal, act, ffn):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    silu = lambda a: a / (1.0 + np.exp(-a))
    sigmoid = lambda a: 1.0 / (1.0 + np.exp(-a))
    lin = lambda a, q: a @ q["kernel"] + q["bias"]
    B, T, C = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    c = min(chunk, T)
    rel = _np_mega_rel_bias(p["rel_pos_bias"], c)
    for bi in range(B):
        res = x[bi].astype(np.float64)
        xn = _np_layernorm(res, p["norm"])
        val = silu(lin(xn, p["v_proj"]))
        mx = silu(_np_tcn(xn, p["tcn"], levels) + p["omega"] * xn)
        base = lin(mx, p["mx_proj"])
        u, zr, hx = base[:, :C], base[:, C : C + z + v], base[:, C + z + v :]
        zz, r = silu(zr[:, :z]), silu(zr[:, z:])
        q = zz * p["gamma"][0] + p["beta"][0]
        k = zz * p["gamma"][1] + p["beta"][1]
        o = np.zeros((T, v))
        for s0 in range(0, T, c):
            idx = list(range(s0, min(s0 + c, T)))
            for a, i in enumerate(idx):
                keys = [(bj, j) for bj, j in enumerate(idx) if not causal or j <= i]
                sc = np.array([q[i] @ k[j] for _, j in keys])
                rb = np.array([rel[a, bj] for bj, _ in keys])
                if act == "softmax":
                    e = sc / math.sqrt(z) + rb
                    w = np.exp(e - e.max())
                    w = w / w.sum()
                elif act == "laplace":
                    e = sc / len(keys) + rb
                    w = np.array(
                        [0.5 * (1 + math.erf((t - 0.707107) / (0.282095 * 2**0.5))) for t in e]
                    )
                else:
                    e = sc / len(keys) + rb
                    w = np.maximum(e, 0.0) ** 2
                o[i] = sum(wj * val[j] for wj, (_, j) in zip(w, keys, strict=True))
        h = silu(hx + lin(o * r, p["h_proj"]))
        y = res + sigmoid(u) * (h - res)
        if ffn:
            y = y + lin(
                silu(lin(_np_layernorm(y, p["ffn"]["norm"]), p["ffn"]["fc1"])), p["ffn"]["fc2"]
            )
        out[bi] = y
    return out


def _perturbed(params, key, scale=0.3):
    """Init + noise: non-zero biases and β, TCN taps far from their tiny N(0, 0.01) init."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.parametrize(
    "act,causal,T,ffn",
    [("softmax", True, 20, 9), ("laplace", False, 20, 9), ("relu2", True, 6, 0)],
)
def test_tcnca_matches_numpy_mega_formulation(act, causal, T, ffn):
    B, C, z, v, chunk, levels = 2, 6, 5, 7, 8, 2  # T=20: chunks 8, 8, 4; T=6 < chunk: one chunk
    x = jax.random.normal(jax.random.key(0), (B, T, C))
    layer = TCNCA(
        z_dim=z,
        v_dim=v,
        ffn_dim=ffn,
        chunk_size=chunk,
        tcn_levels=levels,
        causal=causal,
        attention_activation=act,
    )
    params = _perturbed(jax.jit(layer.init)(jax.random.key(1), x), jax.random.key(2))
    got = np.asarray(jax.jit(layer.apply)(params, x), np.float64)
    want = _np_tcnca(
        np.asarray(x, np.float64),
        params,
        z=z,
        v=v,
        chunk=chunk,
        levels=levels,
        causal=causal,
        act=act,
        ffn=ffn,
    )
    assert ("ffn" in params["params"]) == (ffn > 0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_tcnca_mega_initialisation_and_layout():
    C, z, v, chunk = 8, 16, 24, 32
    x = jax.random.normal(jax.random.key(0), (1, 40, C))
    p = jax.jit(TCNCA(z_dim=z, v_dim=v, chunk_size=chunk).init)(jax.random.key(1), x)["params"]
    assert p["mx_proj"]["kernel"].shape == (C, 2 * C + z + v)  # [u | z, r | hx], as mx_proj
    assert p["v_proj"]["kernel"].shape == (C, v) and p["h_proj"]["kernel"].shape == (v, C)
    assert p["rel_pos_bias"].shape == (2 * chunk - 1,)
    assert p["ffn"]["fc1"]["kernel"].shape == (C, 2 * C)  # default ffn_dim = 2·C
    for w in (p["mx_proj"]["kernel"], p["v_proj"]["kernel"], p["ffn"]["fc1"]["kernel"]):
        assert 0.012 < float(jnp.std(w)) < 0.03  # N(0, 0.02)
    for b in (p["mx_proj"]["bias"], p["h_proj"]["bias"], p["beta"], p["ffn"]["fc2"]["bias"]):
        assert not np.any(np.asarray(b))
    assert 0.5 < float(jnp.std(p["omega"])) < 1.6  # the EMA's ω ~ N(0, 1)


def test_relative_position_bias_matches_mega_tiling():
    table = np.asarray(jax.random.normal(jax.random.key(0), (2 * 6 - 1,)))
    for n in (1, 4, 6):
        np.testing.assert_array_equal(
            simple_relative_position_bias(jnp.asarray(table), n), _np_mega_rel_bias(table, n)
        )


def test_tcnca_causal_shapes_dtype_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 37, 8))
    # New future tokens (random: a constant shift would vanish in the LayerNorm).
    x2 = x.at[:, 20:].set(jax.random.normal(jax.random.key(3), (2, 17, 8)))
    block = TCNCA(z_dim=16, chunk_size=8, tcn_levels=2)
    params = _perturbed(jax.jit(block.init)(jax.random.key(1), x), jax.random.key(2), 0.1)
    apply = jax.jit(block.apply)
    y, y2 = apply(params, x), apply(params, x2)
    assert y.shape == x.shape
    np.testing.assert_allclose(y[:, :20], y2[:, :20], atol=1e-6)  # the past is unchanged
    assert not np.allclose(y[:, 20:], y2[:, 20:], atol=1e-3)
    bidir = jax.jit(TCNCA(z_dim=16, chunk_size=8, tcn_levels=2, causal=False).apply)
    yb, yb2 = bidir(params, x), bidir(params, x2)
    assert not np.allclose(yb[:, 16:20], yb2[:, 16:20], atol=1e-4)  # the chunk 16–23 sees ahead
    np.testing.assert_allclose(yb[:, :16], yb2[:, :16], atol=1e-6)  # earlier chunks do not
    g = jax.jit(jax.grad(lambda p: jnp.sum(block.apply(p, x) ** 2)))(params)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    bf16 = TCNCA(z_dim=16, chunk_size=8, tcn_levels=2, dtype=jnp.bfloat16)
    assert jax.eval_shape(bf16.apply, params, x).dtype == jnp.bfloat16  # traced, not compiled


def test_tcnca_silu_input_is_signed():
    """The TCN's last level has no output ReLU: TCN(X) itself, not only ω ⊙ X, goes negative."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 8))
    layer = TCNCA(z_dim=8, chunk_size=8, tcn_levels=3)
    params = jax.jit(layer.init)(jax.random.key(1), x)  # the default initialisation
    trained = _perturbed(params, jax.random.key(2))  # taps far from the N(0, 0.01) init

    def inner(p):
        _, st = layer.apply(p, x, capture_intermediates=True, mutable=["intermediates"])
        tcn_out = np.asarray(st["intermediates"]["tcn"]["__call__"][0])
        return tcn_out, np.asarray(st["intermediates"]["silu_input"][0])

    tcn_out, pre = inner(params)
    assert tcn_out.min() < -1e-6 and (pre < 0).mean() > 0.3
    tcn_out, pre = inner(trained)
    assert (tcn_out < 0).mean() > 0.1 and (pre < 0).mean() > 0.2
    relu_tcn = TCN(8, 3, 3, depthwise=True)  # Bai et al.'s last ReLU: never negative
    for p in (params, trained):
        assert float(relu_tcn.apply({"params": p["params"]["tcn"]}, x).min()) >= 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        TCN(features=4).init(jax.random.key(0), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="depthwise needs"):
        TCN(features=6, depthwise=True).init(jax.random.key(0), jnp.ones((1, 5, 4)))
    with pytest.raises(ValueError, match=r"TCNCA: x must be \[B, T, C\], got shape \(5, 4\)"):
        TCNCA(z_dim=4, chunk_size=4).init(jax.random.key(0), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="floating point, got dtype int32"):
        TCNCA(z_dim=4, chunk_size=4).init(jax.random.key(0), jnp.ones((1, 5, 4), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        TCNCA(z_dim=4, chunk_size=0).init(jax.random.key(0), jnp.ones((1, 5, 4)))
    with pytest.raises(ValueError, match="attention_activation must be one of .* got 'gelu'"):
        TCNCA(z_dim=4, attention_activation="gelu").init(jax.random.key(0), jnp.ones((1, 5, 4)))
    q = jnp.ones((1, 5, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        chunked_attention(q, q, q, 4, activation="tanh")
    with pytest.raises(ValueError, match="1 <= n <= M"):
        simple_relative_position_bias(jnp.ones((7,)), 5)


# ---- the length benchmark, shrunk ------------------------------------------------------------


def test_tcnca_benchmark_quick_table(monkeypatch):
    from benchmarks import tcnca as bench

    for name, value in dict(
        QUICK_LENGTHS=(32,), WIDTH=4, EMA_NDIM=2, QUICK_ITERS=2, WARMUP=1
    ).items():
        monkeypatch.setattr(bench, name, value)
    # The two EMA forms are the same map: FFT of the closed-form kernel == the scanned recurrence.
    fns, x = bench._case_fns(32)
    f_fft, p = fns["ema_fft"]
    np.testing.assert_allclose(f_fft(p, x), bench.ema_scan(p, x), rtol=1e-4, atol=1e-5)
    assert bench.tcn_levels_for(32) == 4 and tcn_receptive_field(3, 4) >= 32 > 29
    out = bench.run(quick=True)
    on_cpu = jax.default_backend() == "cpu"
    head = "| case | impl |" + ("" if on_cpu else " median time |") + " time / tcn |"
    assert head in out and ("median time" in out) != on_cpu  # CPU: ratios only
    for impl in bench.IMPLS:
        assert out.count(f"| {impl} |") == 2  # forward and forward + backward
    assert "L=32 (TCN 4 levels) fwd+bwd | tcn |" in out and "fwd | ema_scan |" in out


# ---- torch: MEGA's layer rebuilt in its own layout, the EMA swapped for the TCN --------------


def _torch_mega_tcnca(params, x, *, z, v, chunk, levels, causal):
    """MEGA's MovingAverageGatedAttention (softmax, simple relative bias, chunked) + NFFN, in
    torch and MEGA's [T, B, C] layout, with ``MultiHeadEMA`` replaced by the causal TCN."""
    import torch
    import torch.nn.functional as F

    P = jax.tree.map(lambda a: torch.tensor(np.asarray(a), dtype=torch.float64), params["params"])
    lin = lambda a, q: F.linear(a, q["kernel"].T, q["bias"])
    norm = lambda a, q: F.layer_norm(a, a.shape[-1:], q["scale"], q["bias"], eps=1e-5)

    def conv(a, q, d):  # a [B, C, T]; torch Conv1d weight [C, 1, k]
        w = q["kernel"].permute(2, 1, 0)
        return F.conv1d(
            F.pad(a, ((w.shape[-1] - 1) * d, 0)), w, q["bias"], dilation=d, groups=a.shape[1]
        )

    def tcn(a):  # [T, B, C] -> [T, B, C]
        h = a.permute(1, 2, 0)
        for lvl in range(levels):
            q, d = P["tcn"][f"level{lvl}"], 2**lvl
            y = conv(F.relu(conv(h, q["conv1"], d)), q["conv2"], d)
            h = y + h if lvl == levels - 1 else F.relu(F.relu(y) + h)
        return h.permute(2, 0, 1)

    def rel_bias(n):  # SimpleRelativePositionalBias.forward
        M = chunk
        b = P["rel_pos_bias"][M - n : M + n - 1]
        t = torch.tile(F.pad(b, (0, n)), (n,))[:-n].view(n, 3 * n - 2)
        r = (2 * n - 1) // 2
        return t[:, r : t.size(1) - r]

    xt = torch.tensor(np.asarray(x), dtype=torch.float64).transpose(0, 1)  # [T, B, C]
    T, B, C = xt.shape
    residual = xt
    xn = norm(xt, P["norm"])
    val = F.silu(lin(xn, P["v_proj"]))
    mx = F.silu(tcn(xn) + xn * P["omega"])
    u, zr, hx = torch.split(lin(mx, P["mx_proj"]), [C, z + v, C], dim=-1)
    u = torch.sigmoid(u)
    zz, r = torch.split(F.silu(zr), [z, v], dim=-1)
    q, k = torch.unbind(zz.unsqueeze(2) * P["gamma"] + P["beta"], dim=2)
    q, k, val = (a.transpose(0, 1).reshape(B, T // chunk, chunk, -1) for a in (q, k, val))
    qk = torch.matmul(q * z**-0.5, k.transpose(2, 3)) + rel_bias(chunk)
    if causal:
        qk = qk + torch.triu(torch.full((chunk, chunk), float("-inf")), 1)
    h = torch.matmul(F.softmax(qk, dim=-1), val).view(B, T, v).transpose(0, 1)
    h = F.silu(hx + lin(h * r, P["h_proj"]))
    out = torch.addcmul(residual, u, h - residual)
    out = out + lin(F.silu(lin(norm(out, P["ffn"]["norm"]), P["ffn"]["fc1"])), P["ffn"]["fc2"])
    return out.transpose(0, 1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("causal", [True, False])
def test_tcnca_matches_torch_mega_layer(causal):
    B, T, C, z, v, chunk, levels = 2, 24, 6, 5, 7, 8, 3  # MEGA needs T % chunk == 0
    x = jax.random.normal(jax.random.key(0), (B, T, C))
    layer = TCNCA(z_dim=z, v_dim=v, ffn_dim=10, chunk_size=chunk, tcn_levels=levels, causal=causal)
    params = _perturbed(jax.jit(layer.init)(jax.random.key(1), x), jax.random.key(2))
    got = np.asarray(jax.jit(layer.apply)(params, x), np.float64)
    want = _torch_mega_tcnca(params, x, z=z, v=v, chunk=chunk, levels=levels, causal=causal)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
