"""TGN memory + PRES (paper 39): filter statistics, update ordering, GRU, coherence, bad inputs.

The config's smoke run is `tests/train/test_configs_smoke.py` (``pres_temporal_graph:smoke``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.temporal_graph import temporal_events, temporal_windows
from jaxblocks.layers.temporal_graph import (
    TGN,
    TGNStep,
    aggregate_last,
    gru_cell,
    init_tgn_state,
    memory_coherence,
    official_normalize,
    pres_filter_update,
    pres_official_blend,
    pres_variance,
    update_neighbors,
)
from jaxblocks.models.tgn import TGNConfig, TGNLinkPredictor
from jaxblocks.train.tasks import average_precision, get_task

TINY = dict(num_nodes=12, memory_dim=8, edge_dim=3, num_neighbors=3)


def _events(key, b, n=12, f=3, t0=0.0):
    k1, k2, k3 = jax.random.split(key, 3)
    ids = jax.random.randint(k1, (b, 3), 0, n).astype(jnp.float32)
    t = t0 + jnp.sort(jax.random.uniform(k2, (b, 1), maxval=10.0), axis=0)
    return jnp.concatenate([ids, t, jax.random.normal(k3, (b, f))], -1)


def test_pres_filter_matches_numpy_loop():
    n, d, steps, gamma = 6, 4, 5, 0.9
    rng = np.random.default_rng(0)
    count, s1, s2 = jnp.zeros(n), jnp.zeros((n, d)), jnp.zeros((n, d))
    c_np, s1_np, s2_np = np.zeros(n), np.zeros((n, d)), np.zeros((n, d))
    prev = rng.standard_normal((n, d)).astype(np.float32)
    for _ in range(steps):
        upd = prev + rng.standard_normal((n, d)).astype(np.float32)
        mask = rng.random(n) < 0.6
        fused, count, s1, s2 = pres_filter_update(prev, upd, mask, count, s1, s2, gamma)
        want = upd.copy()
        for i in range(n):
            if mask[i]:
                mu = s1_np[i] / max(c_np[i], 1.0)
                want[i] = gamma * (prev[i] + mu) + (1 - gamma) * upd[i]
                delta = want[i] - prev[i]
                c_np[i] += 1
                s1_np[i] += delta
                s2_np[i] += delta**2
        np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(count, c_np)
        np.testing.assert_allclose(s1, s1_np, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s2, s2_np, rtol=1e-5, atol=1e-5)
        prev = np.asarray(fused)
    seen = c_np > 0
    var = np.asarray(pres_variance(count, s1, s2))
    mu = s1_np[seen] / c_np[seen, None]
    np.testing.assert_allclose(var[seen], s2_np[seen] / c_np[seen, None] - mu**2, atol=1e-5)
    assert seen.any() and (~mask).any()


def test_gru_cell_matches_formula():
    rng = np.random.default_rng(1)
    m, d, n = 5, 4, 3
    p = {k: rng.standard_normal(s).astype(np.float32)
         for k, s in (("kernel_i", (m, 3 * d)), ("kernel_h", (d, 3 * d)), ("bias_i", (3 * d,)),
                      ("bias_h", (3 * d,)))}  # fmt: skip
    x, h = rng.standard_normal((n, m)), rng.standard_normal((n, d))

    def sig(v):
        return 1 / (1 + np.exp(-v))

    wi, wh, bi, bh = p["kernel_i"], p["kernel_h"], p["bias_i"], p["bias_h"]
    r = sig(x @ wi[:, :d] + bi[:d] + h @ wh[:, :d] + bh[:d])
    z = sig(x @ wi[:, d : 2 * d] + bi[d : 2 * d] + h @ wh[:, d : 2 * d] + bh[d : 2 * d])
    cand = np.tanh(x @ wi[:, 2 * d :] + bi[2 * d :] + r * (h @ wh[:, 2 * d :] + bh[2 * d :]))
    want = (1 - z) * cand + z * h
    got = gru_cell(jax.tree.map(jnp.asarray, p), jnp.asarray(x, jnp.float32),
                   jnp.asarray(h, jnp.float32))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_gru_cell_matches_torch_grucell():
    import torch

    rng = np.random.default_rng(2)
    m, d = 6, 5
    cell = torch.nn.GRUCell(m, d)
    p = {
        "kernel_i": jnp.asarray(cell.weight_ih.detach().numpy().T),
        "kernel_h": jnp.asarray(cell.weight_hh.detach().numpy().T),
        "bias_i": jnp.asarray(cell.bias_ih.detach().numpy()),
        "bias_h": jnp.asarray(cell.bias_hh.detach().numpy()),
    }
    x = rng.standard_normal((4, m)).astype(np.float32)
    h = rng.standard_normal((4, d)).astype(np.float32)
    want = cell(torch.from_numpy(x), torch.from_numpy(h)).detach().numpy()
    np.testing.assert_allclose(gru_cell(p, jnp.asarray(x), jnp.asarray(h)), want, atol=1e-5)


def _np_normalize(x):
    x = x.copy()
    if x.max() != x.min():
        x = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    return x


def test_memory_coherence_matches_official_form():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    na, nb = _np_normalize(a), _np_normalize(b)
    cos = (na * nb).sum(0) / (np.linalg.norm(na, axis=0) * np.linalg.norm(nb, axis=0))
    want = cos.sum() / a.shape[0]
    got = memory_coherence(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # identical memories are fully coherent: D dimensions / N nodes
    np.testing.assert_allclose(memory_coherence(jnp.asarray(a), jnp.asarray(a)), 5 / 7, rtol=1e-5)
    g = jax.grad(lambda m: memory_coherence(m, jnp.asarray(b, jnp.float32)))(jnp.asarray(a))
    assert float(jnp.abs(g).max()) > 0


@pytest.mark.torch
def test_memory_coherence_matches_torch_cosine_similarity():
    import torch

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((9, 3)), rng.standard_normal((9, 3))
    cos = torch.nn.CosineSimilarity(dim=0)
    ta, tb = torch.from_numpy(_np_normalize(a)), torch.from_numpy(_np_normalize(b))
    want = float(cos(ta, tb).sum() / a.shape[0])
    got = memory_coherence(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_aggregate_last_and_neighbour_buffers_match_loops():
    rng = np.random.default_rng(5)
    n, k, b, f = 5, 3, 9, 2
    src, dst = rng.integers(0, n, b), rng.integers(0, n, b)
    t = np.sort(rng.uniform(0, 5, b)).astype(np.float32)
    feat = rng.standard_normal((b, f)).astype(np.float32)
    vals = rng.standard_normal((b, 2))
    got, has = aggregate_last(jnp.asarray(src), jnp.asarray(vals), n)
    for i in range(n):
        hits = np.flatnonzero(src == i)
        assert bool(has[i]) == bool(len(hits))
        if len(hits):
            np.testing.assert_allclose(got[i], vals[hits[-1]])
    state = init_tgn_state(n, 4, f, k)
    state = update_neighbors(state, jnp.asarray(src), jnp.asarray(dst), jnp.asarray(t),
                             jnp.asarray(feat))  # fmt: skip
    lists = {i: [] for i in range(n)}
    for e in range(b):
        lists[src[e]].append((dst[e], t[e]))
        lists[dst[e]].append((src[e], t[e]))
    for i in range(n):
        want = sorted(lists[i][-k:], key=lambda p: p[1])
        valid = np.asarray(state.nbr_valid[i])
        got_i = sorted(zip(np.asarray(state.nbr_id[i])[valid], np.asarray(state.nbr_time[i])[valid],
                           strict=True), key=lambda p: p[1])  # fmt: skip
        assert [int(a) for a, _ in got_i] == [int(a) for a, _ in want]
        np.testing.assert_allclose([x for _, x in got_i], [x for _, x in want])


@pytest.mark.parametrize("use_pres,mode", [(False, "official"), (True, "official"),
                                           (True, "stored")])  # fmt: skip
def test_no_intra_batch_leakage_in_a_window(use_pres, mode):
    # 3 temporal batches of 4: changing an event of batch 1 must leave the predictions of
    # batches 0 and 1 exactly unchanged (memory and neighbours update after the batch) and
    # change those of batch 2.
    model = TGNLinkPredictor(**TINY, temporal_batch=4, use_pres=use_pres, pres_mode=mode,
                             coherence_weight=0.1)  # fmt: skip
    x = _events(jax.random.key(0), 12)[None]
    x = x.at[0, :, 0].set(jnp.asarray([0, 1, 2, 3, 0, 4, 5, 6, 0, 1, 7, 8], jnp.float32))
    v = model.init(jax.random.key(1), x)
    base, pen = model.apply(v, x)
    x2 = x.at[0, 5, 1].set((x[0, 5, 1] + 3) % 12).at[0, 5, 4:].add(2.0)
    x2 = x2.at[0, 4, 4:].add(1.5)  # the shared source 0's event in batch 1
    out, _ = model.apply(v, x2)
    keep = np.ones((8, 2), bool)
    keep[5, 0] = False  # the changed event's own positive score reads its new destination
    np.testing.assert_array_equal(np.asarray(out[0, :8])[keep], np.asarray(base[0, :8])[keep])
    assert float(jnp.abs(out[0, 8:] - base[0, 8:]).max()) > 1e-6
    assert pen.shape == (1,) and np.isfinite(float(pen[0]))


def _np_official_normalize(x):
    # the official Filter/MDGNN in-place normalisation, skipped when max == 0
    x = x.copy()
    if x.max() != 0:
        x -= x.min()
        x /= x.max()
        x = 2 * x - 1
    return x


def test_pres_official_blend_matches_numpy_loop():
    n, d, gamma = 7, 3, 0.9
    rng = np.random.default_rng(10)
    incr, sq = jnp.zeros((n, d)), jnp.zeros((n, d))
    inc_np, sq_np = np.zeros((n, d)), np.zeros((n, d))
    prev = rng.standard_normal((n, d)).astype(np.float32)
    for step in range(4):
        upd = prev + rng.standard_normal((n, d)).astype(np.float32)
        blend, incr, sq = pres_official_blend(prev, upd, incr, sq, gamma)
        transition = _np_official_normalize(inc_np)
        if step == 0:
            assert np.all(transition == 0)  # an empty filter predicts no change
        want = gamma * (prev + transition) + (1 - gamma) * upd
        change = want - prev
        if change.max() != 0:  # the official update is skipped when max(change) == 0
            change = _np_official_normalize(change)
            inc_np = inc_np + 1 + change  # the official update adds 1 to the increment sum
            sq_np = sq_np + change * change
        np.testing.assert_allclose(blend, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(incr, inc_np, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sq, sq_np, rtol=1e-5, atol=1e-5)
        prev = upd  # official: the stored memory stays the GRU's, not the blend
    # gradient reaches the GRU output through the blend only, scaled by 1 - γ
    g = jax.grad(lambda u: pres_official_blend(prev, u, incr, sq, gamma)[0].sum())(upd)
    np.testing.assert_allclose(g, np.full((n, d), 1 - gamma), rtol=1e-5)
    # max == 0 is left alone as in the official code; a constant non-zero tensor too
    np.testing.assert_array_equal(official_normalize(jnp.asarray([-2.0, 0.0])), [-2.0, 0.0])
    np.testing.assert_array_equal(official_normalize(jnp.full((2,), 3.0)), [3.0, 3.0])


def test_pres_official_blend_skips_update_without_change():
    # a fresh memory with no messages: the blend equals prev, the official filter is not
    # updated (no "+ 1"), so the next batch's prediction is still prev, not prev + 1
    n, d = 5, 3
    z = jnp.zeros((n, d))
    blend, incr, sq = pres_official_blend(z, z, z, z, 0.9)
    np.testing.assert_array_equal(incr, np.zeros((n, d)))
    np.testing.assert_array_equal(sq, np.zeros((n, d)))
    upd = jnp.asarray(np.random.default_rng(0).standard_normal((n, d)), jnp.float32)
    blend, incr, _ = pres_official_blend(z, upd, incr, sq, 0.9)
    np.testing.assert_allclose(blend, 0.1 * upd, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(incr).max()) > 0  # a real change is recorded
    # a non-positive change whose max is exactly 0: skipped too, as in the official code
    _, incr2, _ = pres_official_blend(z, (-jnp.abs(upd)).at[0, 0].set(0.0), incr, incr, 0.0)
    np.testing.assert_array_equal(incr2, incr)


def test_official_mode_blends_embeddings_but_stores_gru_memory():
    e1, e2 = _events(jax.random.key(11), 6), _events(jax.random.key(12), 6, t0=10.0)
    outs = {}
    for name, kw in (("off", dict(use_pres=False)), ("official", dict(use_pres=True)),
                     ("stored", dict(use_pres=True, pres_mode="stored"))):  # fmt: skip
        step = TGNStep(**TINY, **kw)
        state = init_tgn_state(12, 8, 3, 3)
        v = step.init(jax.random.key(13), state, e1)  # same params for every mode
        state, _ = step.apply(v, state, e1)
        state, (pos, neg, _) = step.apply(v, state, e2)
        outs[name] = (state, pos)
    st_off, st_off2 = outs["off"][0], outs["official"][0]
    # official: the stored memory (and the messages built from it) equal the plain TGN's ...
    np.testing.assert_allclose(st_off2.memory, st_off.memory, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st_off2.msg, st_off.msg, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(st_off2.pres_sum).max()) > 0
    # ... while the blend changes the predictions
    assert float(jnp.abs(outs["official"][1] - outs["off"][1]).max()) > 1e-6
    # stored: the blend becomes the memory
    assert float(jnp.abs(outs["stored"][0].memory - st_off.memory).max()) > 1e-6


def test_streaming_tgn_keeps_state_in_memory_collection():
    tgn = TGN(dict(TINY, use_pres=True, pres_mode="stored"))
    e1, e2 = _events(jax.random.key(2), 6), _events(jax.random.key(3), 6, t0=10.0)
    v = tgn.init(jax.random.key(4), e1)
    assert float(jnp.abs(v["memory"]["state"].memory).max()) == 0.0
    _, v1 = tgn.apply(v, e1, mutable=["memory"])
    st1 = v1["memory"]["state"]
    assert bool(st1.has_msg.any()) and float(st1.last_update.max()) == 0.0
    _, v2 = tgn.apply({**v, **v1}, e2, mutable=["memory"])
    st2 = v2["memory"]["state"]
    # the first batch's messages updated the memory at the start of the second batch
    assert float(jnp.abs(st2.memory).max()) > 0 and float(st2.pres_count.max()) == 1.0
    np.testing.assert_allclose(st2.last_update[st1.has_msg], st1.msg_time[st1.has_msg])


def test_windowed_model_equals_streaming_steps():
    model = TGNLinkPredictor(**TINY, temporal_batch=3, message_function="mlp")
    x = _events(jax.random.key(5), 9)[None]
    v = model.init(jax.random.key(6), x)
    logits, _ = model.apply(v, x)
    step = TGNStep(**TINY, message_function="mlp")
    state = init_tgn_state(12, 8, 3, 3)
    p = {"params": v["params"]["tgn"]}
    outs = []
    for s in range(3):
        state, (pos, neg, _) = step.apply(p, state, x[0, 3 * s : 3 * s + 3])
        outs.append(jnp.stack([pos, neg], -1))
    np.testing.assert_allclose(logits[0], jnp.concatenate(outs), rtol=1e-5, atol=1e-6)


def test_link_prediction_task_and_average_precision():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 5, 2)).astype(np.float32)
    w = np.ones((2, 5), np.float32)
    m = get_task("link_prediction").metrics((jnp.asarray(logits), jnp.asarray([0.1, 0.2])), w)
    lab = np.tile([1.0, 0.0], 5)
    for i in range(2):
        s = logits[i].reshape(-1)
        np.testing.assert_allclose(m["ap"][i], average_precision_score(lab, s), rtol=1e-5)
        acc = ((logits[i, :, 0] > 0).sum() + (logits[i, :, 1] <= 0).sum()) / 10
        np.testing.assert_allclose(m["accuracy"][i], acc)
        bce = np.mean(np.log1p(np.exp(-logits[i, :, 0])) + np.log1p(np.exp(logits[i, :, 1]))) / 2
        np.testing.assert_allclose(m["loss"][i], bce + [0.1, 0.2][i], rtol=1e-5)
    ap = average_precision(jnp.asarray([3.0, 2.0, 1.0]), jnp.asarray([1.0, 0.0, 1.0]),
                           jnp.ones(3))  # fmt: skip
    np.testing.assert_allclose(ap, (1 + 2 / 3) / 2, rtol=1e-6)


def test_generator_windows_are_consecutive_and_bursty():
    ev = temporal_events(2000, 32, seed=0)
    assert np.all(np.diff(ev["t"]) > 0) and ev["src"].max() < 32 and ev["dst"].max() < 32
    # repeated partners: a source's next destination often equals its previous one
    last, rep, tot = {}, 0, 0
    for s, d in zip(ev["src"], ev["dst"], strict=True):
        if s in last:
            rep, tot = rep + (last[s] == d), tot + 1
        last[s] = d
    assert rep / tot > 0.4
    x, y = temporal_windows(3, 50, 32, edge_dim=4, seed=1)
    assert x.shape == (3, 50, 8) and y.shape == (3, 50)
    assert np.all(x[:, 0, 3] == 0) and np.all(np.diff(x[..., 3], axis=1) > 0)


def test_bad_inputs():
    model = TGNLinkPredictor(**TINY, temporal_batch=4)
    x = _events(jax.random.key(8), 8)[None]
    v = model.init(jax.random.key(9), x)
    with pytest.raises(ValueError, match=r"x must be \[B, L, 4 \+ edge_dim\] = \[B, L, 7\]"):
        model.apply(v, x[..., :6])
    with pytest.raises(ValueError, match="multiple of temporal_batch=4"):
        model.apply(v, x[:, :6])
    with pytest.raises(ValueError, match="x must be floating"):
        model.apply(v, x.astype(jnp.int32))
    with pytest.raises(ValueError, match="events must be"):
        TGNStep(**TINY).init(jax.random.key(0), init_tgn_state(12, 8, 3, 3), x[0, :, :5])
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        TGNConfig(memory_dim=8, num_heads=3)
    with pytest.raises(ValueError, match="message_function must be one of"):
        TGNConfig(message_function="sum")
    with pytest.raises(ValueError, match="pres_mode must be one of"):
        TGNConfig(pres_mode="all")
    with pytest.raises(ValueError, match="TGNStep: pres_mode must be one of"):
        TGNStep(**TINY, pres_mode="x").init(jax.random.key(0), init_tgn_state(12, 8, 3, 3), x[0])
    with pytest.raises(ValueError, match="pres_gamma must be in"):
        TGNConfig(pres_gamma=1.5)
    with pytest.raises(ValueError, match="temporal_batch must be a positive int"):
        TGNConfig(temporal_batch=0)
    with pytest.raises(ValueError, match=r"logits must be \[B, L, 2\]"):
        get_task("link_prediction").metrics(jnp.zeros((2, 5, 3)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="need num_nodes >= 2"):
        temporal_events(10, num_nodes=1)
