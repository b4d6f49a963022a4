"""CBQ: coarse-to-fine outlier preprocessing, LoRA-Rounding and cross-block reconstruction."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.compress import cbq
from jaxblocks.compress.cbq import (
    RECIPES,
    CBQRecipe,
    cbq_activation_quant,
    cbq_quantize,
    detect_outliers,
    init_lora_rounding,
    lora_rounded_weight,
    migrate_scales,
    outlier_channel_scales,
    per_token_fake_quant,
    quantized_apply,
    rectified_sigmoid,
    rtn_quantize,
    truncate_weight_outliers,
)
from jaxblocks.compress.quantize import dequantize, quantize
from jaxblocks.models.gla_lm import GLALM, GLAConfig
from jaxblocks.models.transformer_lm import TransformerLM

KW = dict(vocab_size=32, dim=32, depth=2, num_heads=2)
GLA = GLAConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, mlp_hidden_size=64,
                use_short_conv=True)  # fmt: skip


def _lm():
    model = TransformerLM(**KW)
    toks = jax.random.randint(jax.random.key(0), (8, 16), 0, 32)
    return model, model.init(jax.random.key(1), toks), toks


@pytest.fixture(scope="module")
def w4a8():
    """One CBQ run: two blocks, one window (W4A8). 200 steps: at 100 the window MSE against
    round-to-nearest ranged 0.82-1.04x over calibration seeds (minibatches of 4 of 8 sequences
    are noisy); at 200 it was 0.89x (this seed) and 0.94x (seed 3)."""
    model, v, toks = _lm()
    q, report, windows = cbq_quantize(model, v, toks, "W4A8", steps=200, key=jax.random.key(2))
    return model, v, toks, q, report, windows


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_recipes_bit_widths():
    assert {n: (r.weight_bits, r.act_bits, r.group_size) for n, r in RECIPES.items()} == {
        "W4A8": (4, 8, None), "W4A4": (4, 4, None), "W2A16": (2, None, 64)}  # fmt: skip
    assert [r.name for r in RECIPES.values()] == list(RECIPES)
    model, v, toks = _lm()
    for name, r in RECIPES.items():
        q, report = rtn_quantize(model, v, name)
        assert len(report) == 2 * 6 and all(e["bits"] == r.weight_bits for e in report.values())
        fc1 = np.asarray(q["params"]["blocks_0"]["fc1"]["kernel"])  # [32, 128]
        levels = max(len(np.unique(fc1[:, j])) for j in range(fc1.shape[1]))
        assert levels <= 2**r.weight_bits
        np.testing.assert_array_equal(q["params"]["embed"]["embedding"],
                                      v["params"]["embed"]["embedding"])  # fmt: skip
    # a 3-D query kernel [C, H, D] is quantised per output (h, d) pair over its 32 inputs
    q, _ = rtn_quantize(model, v, CBQRecipe(2, None))
    qk = np.asarray(q["params"]["blocks_0"]["attn"]["query"]["kernel"]).reshape(32, -1)
    assert max(len(np.unique(qk[:, j])) for j in range(qk.shape[1])) <= 4
    # activations: per token, 2^bits levels; A16 leaves the model float
    x = jax.random.normal(jax.random.key(3), (2, 5, 24))
    y = per_token_fake_quant(x, 4)
    assert max(len(np.unique(np.asarray(y)[b, t])) for b in range(2) for t in range(5)) <= 16
    assert float(jnp.max(jnp.abs(y - x))) > 0
    assert cbq_activation_quant("W2A16") is None
    assert quantized_apply(model, "W2A16") == model.apply


def test_hook_and_interceptor_quantise_the_same_activations():
    # TransformerLM's act_quant hook and the Dense interceptor (used for other LMs) agree
    model, v, toks = _lm()
    hooked = quantized_apply(model, "W4A4")(v, toks)
    with cbq._quantise_linear_inputs(4, lambda p: len(p) > 1 and p[0].startswith("blocks_")):
        intercepted = model.apply(v, toks)
    np.testing.assert_allclose(hooked, intercepted, rtol=1e-5, atol=1e-5)
    assert _rel(hooked, model.apply(v, toks)) > 1e-3


def test_detect_outliers_finds_planted_outliers():
    rows = jnp.abs(jax.random.normal(jax.random.key(0), (4, 256)))
    planted = [[3, 70, 200], [5], [10, 11, 12, 13], [100, 101]]
    for i, idx in enumerate(planted):
        rows = rows.at[i, jnp.array(idx)].set(15.0 + jnp.arange(len(idx)))
    mask = np.asarray(detect_outliers(rows))
    for i, idx in enumerate(planted):
        assert sorted(np.flatnonzero(mask[i])) == idx
    # no value beyond the quartile fence: no outliers
    flat = jax.random.uniform(jax.random.key(1), (3, 64))
    assert not np.any(detect_outliers(flat))


def test_weight_outliers_are_truncated_per_channel():
    w = jax.random.normal(jax.random.key(0), (64, 8))
    w = w.at[5, 2].set(20.0).at[9, 6].set(-25.0)
    t, mask = truncate_weight_outliers(w)
    # the planted outlier is the only one of its channel (others may lose their largest entry)
    assert list(np.flatnonzero(mask[:, 2])) == [5] and list(np.flatnonzero(mask[:, 6])) == [9]
    rest = jnp.abs(jnp.where(mask, 0.0, w))
    np.testing.assert_allclose(t[5, 2], jnp.max(rest[:, 2]))
    np.testing.assert_allclose(t[9, 6], -jnp.max(rest[:, 6]))
    np.testing.assert_array_equal(jnp.where(mask, 0.0, t), jnp.where(mask, 0.0, w))


def test_activation_scaling_keeps_float_outputs_transformer_and_gla():
    model, v, toks = _lm()
    planted = [3, 17]
    p = v["params"]
    ln = p["blocks_1"]["ln1"]
    p = {**p, "blocks_1": {**p["blocks_1"], "ln1": {**ln, "scale": ln["scale"].at[
        jnp.array(planted)].multiply(40.0)}}}  # fmt: skip
    v = {"params": p}
    tr = cbq._trace(model, v, toks)
    assert tr.feeds == {"ln1": ["attn/query", "attn/key", "attn/value"], "ln2": ["fc1"]}
    s, mask = outlier_channel_scales(tr.absmax[("blocks_1", "ln1")])
    assert sorted(np.flatnonzero(mask)) == planted and bool(jnp.all(s[jnp.array(planted)] > 2))
    moved = migrate_scales(p["blocks_1"], "ln1", tr.feeds["ln1"], s)
    v2 = {"params": {**p, "blocks_1": moved}}
    np.testing.assert_allclose(model.apply(v2, toks), model.apply(v, toks), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(cbq._trace(model, v2, toks).absmax[("blocks_1", "ln1")])) < float(
        jnp.max(tr.absmax[("blocks_1", "ln1")]))  # fmt: skip

    gla = GLALM(GLA)
    vg = gla.init(jax.random.key(4), toks)
    tg = cbq._trace(gla, vg, toks)
    assert sorted(tg.feeds["attn_norm"]) == sorted(
        ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/gk_proj_0", "attn/g_proj"]
    )
    assert sorted(tg.feeds["mlp_norm"]) == ["mlp/gate", "mlp/up"]
    pg = dict(nn.unbox(vg["params"]))
    s = 1.0 + 4.0 * jax.random.uniform(jax.random.key(5), (32,))  # any positive scales
    for norm, lins in tg.feeds.items():
        pg["layer_0"] = migrate_scales(pg["layer_0"], norm, lins, s)
    np.testing.assert_allclose(gla.apply({"params": pg}, toks), gla.apply(vg, toks), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_lora_rounding_stays_within_one_step():
    w = jax.random.normal(jax.random.key(0), (2, 16, 24))  # 2 input axes, as an out-projection
    spec = RECIPES["W4A8"].weight_spec(32)
    learned, frozen = init_lora_rounding(w, spec, n_in=2, rank=3, key=jax.random.key(1))
    assert learned["a"].shape == (32, 3) and learned["b"].shape == (3, 24)
    # untrained: soft rounding is the float weight (but where the rounded zero point clips a
    # channel's extremes by less than half a step), hard rounding is round-to-nearest
    soft = lora_rounded_weight(w, learned, frozen, spec, n_in=2).reshape(32, 24)
    err = jnp.abs(soft - w.reshape(32, 24))
    assert float(jnp.mean(err < 1e-5)) > 0.9
    assert bool(jnp.all(err <= 0.5 * frozen["scale"].reshape(1, 24) + 1e-6))
    rtn = dequantize(quantize(w.reshape(32, 24), spec)).reshape(w.shape)
    np.testing.assert_allclose(lora_rounded_weight(w, learned, frozen, spec, n_in=2, hard=True),
                               rtn, atol=1e-5)  # fmt: skip
    # large random low-rank offsets: still within one step of the weight, hard on the grid
    learned = {**learned, "b": 5.0 * jax.random.normal(jax.random.key(2), (3, 24))}
    step = frozen["scale"].reshape(1, 24)
    for hard in (False, True):
        wq = lora_rounded_weight(w, learned, frozen, spec, n_in=2, hard=hard).reshape(32, 24)
        assert bool(jnp.all(jnp.abs(wq - w.reshape(32, 24)) <= step * (1 + 1e-5)))
        assert _rel(wq, w.reshape(32, 24)) > 0.01
    codes = wq / step + frozen["zero"].reshape(1, 24)
    np.testing.assert_allclose(codes, jnp.round(codes), atol=1e-3)
    assert float(codes.min()) > -0.5 and float(codes.max()) < 15.5
    h = rectified_sigmoid(jnp.linspace(-20.0, 20.0, 101))
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0


def test_cbq_window_beats_round_to_nearest(w4a8):
    model, v, toks, q, report, windows = w4a8
    assert [w["blocks"] for w in windows] == [("blocks_0", "blocks_1")]
    assert windows[0]["mse_cbq"] < 0.98 * windows[0]["mse_rtn"]
    # the whole quantised LM's logits: CBQ fits the blocks' outputs, not the float head's view
    # of them; on this random tiny LM its logit error is not below RTN's (0.185 and 0.195 vs
    # 0.180 at this seed, with XLA:CPU at optimisation level 3 and 0), only close to it
    ref, apply = model.apply(v, toks), quantized_apply(model, "W4A8")
    rq, _ = rtn_quantize(model, v, "W4A8")
    assert 0.0 < _rel(apply(q, toks), ref) < 1.25 * _rel(apply(rq, toks), ref)
    assert len(report) == 12 and all(r["bits"] == 4 and r["compression"] > 4
                                     for r in report.values())  # fmt: skip
    fc2 = np.asarray(q["params"]["blocks_1"]["fc2"]["kernel"])
    assert max(len(np.unique(fc2[:, j])) for j in range(fc2.shape[1])) <= 16
    np.testing.assert_array_equal(q["params"]["head"]["kernel"], v["params"]["head"]["kernel"])


def test_windows_slide_with_overlap():
    assert cbq._windows(4, 2, 1) == [(0, 2), (1, 3), (2, 4)]
    assert cbq._windows(5, 3, 1) == [(0, 3), (2, 5)]
    assert cbq._windows(3, 2, 0) == [(0, 2), (2, 3)]
    assert cbq._windows(1, 2, 1) == [(0, 1)]


@pytest.mark.slow
def test_cbq_on_gla_three_windows():
    gla = GLALM(GLAConfig(vocab_size=32, hidden_size=32, num_layers=3, num_heads=2,
                          mlp_hidden_size=64, use_short_conv=True))  # fmt: skip
    toks = jax.random.randint(jax.random.key(0), (8, 16), 0, 32)
    v = gla.init(jax.random.key(1), toks)
    q, report, windows = cbq_quantize(gla, v, toks, "W4A4", steps=20)
    assert [w["blocks"] for w in windows] == [("layer_0", "layer_1"), ("layer_1", "layer_2")]
    assert "layer_2/mlp/down/kernel" in report and not any("conv" in k for k in report)
    assert bool(jnp.all(jnp.isfinite(quantized_apply(gla, "W4A4")(q, toks))))


def test_errors():
    model, v, toks = _lm()
    with pytest.raises(ValueError, match="weight_bits must be an int in"):
        CBQRecipe(weight_bits=1)
    with pytest.raises(ValueError, match="act_bits must be an int in"):
        CBQRecipe(act_bits=16)
    with pytest.raises(ValueError, match="group_size must be None or an int"):
        CBQRecipe(group_size=0)
    with pytest.raises(ValueError, match="recipe must be a CBQRecipe or one of"):
        rtn_quantize(model, v, "W3A3")
    with pytest.raises(ValueError, match="tokens must be integer"):
        cbq_quantize(model, v, toks.astype(jnp.float32), "W4A8")
    with pytest.raises(ValueError, match="overlap must be < window"):
        cbq_quantize(model, v, toks, "W4A8", window=2, overlap=2)
    with pytest.raises(ValueError, match="batch_size 9 exceeds the 8"):
        cbq_quantize(model, v, toks, "W4A8", batch_size=9)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        cbq_quantize(model, v, toks, "W4A8", steps=0)
    with pytest.raises(ValueError, match="variables need a 'params'"):
        cbq_quantize(model, {}, toks, "W4A8")
    with pytest.raises(ValueError, match="no repeated blocks"):
        rtn_quantize(model, {"params": {"head": {"kernel": jnp.ones((2, 2))}}}, "W4A8")
    with pytest.raises(ValueError, match="values need a last axis of >= 2"):
        detect_outliers(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="alpha must be in"):
        outlier_channel_scales(jnp.ones(8), alpha=2.0)
    with pytest.raises(ValueError, match="w must be"):
        truncate_weight_outliers(jnp.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="'ln2' needs a scale of shape"):
        migrate_scales(v["params"]["blocks_0"], "ln2", ["fc1"], jnp.ones(5))
    with pytest.raises(ValueError, match="does not take 32 input channels"):
        migrate_scales(v["params"]["blocks_0"], "ln2", ["fc2"], jnp.ones(32))
    spec = RECIPES["W4A8"].weight_spec(8)
    with pytest.raises(ValueError, match="rank must be an int"):
        init_lora_rounding(jnp.ones((8, 4)), spec, rank=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="spec must be asymmetric groups"):
        init_lora_rounding(jnp.ones((8, 4)), RECIPES["W4A8"].weight_spec(8).__class__(),
                           key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="feature_axes must be in"):
        per_token_fake_quant(jnp.ones((2, 3)), 4, feature_axes=3)


@pytest.mark.slow  # ~40 s on 2 CPU cores: three CBQ calibrations after the smoke training
def test_cbq_stdlib_smoke_run(tmp_path):
    from jaxblocks.train import config as config_lib
    from jaxblocks.train import loop

    cfg = config_lib.load_config("cbq_stdlib", "smoke")
    cfg = config_lib.apply_overrides(cfg, ["progress=False", "plot=False", "tensorboard=False"])
    config_lib.validate(cfg, num_devices=1)
    results = loop.run(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert results[-1][1].final_step == 3
    table = (tmp_path / "cbq.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| W") or ln.startswith("| float")]
    assert len(rows) == 7 and "| W2A16 CBQ |" in table
    ppl = [float(r.split("|")[3]) for r in rows]
    assert all(np.isfinite(ppl)) and min(ppl) > 1.0
