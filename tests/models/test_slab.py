"""SLAB full models: official counts, deploy fold, Swin windowing, block layout, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.slab import (
    SLABSwinBlock,
    linear_resize_tokens,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from jaxblocks.layers.attention import SimplifiedLinearAttention
from jaxblocks.models.slab import SLAB_PARAMS, SLABPVT, SLABDeiT, SLABSwin, fold_slab_model
from jaxblocks.registry import create_model, example_input
from tests.kernels.harness import assert_close


@functools.cache
def _abstract(name, **kw):
    model, x = create_model(name, **kw), example_input(name, **kw)
    return jax.eval_shape(model.init, jax.random.key(0), x)


# Correctness checks on tiny inputs: unoptimized XLA compiles about twice as fast on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _jit_apply(model, **kw):
    """``model.apply(v, x, **kw)`` under jit (eager Flax is slow on a busy CPU)."""
    return jit(lambda v, x: model.apply(v, x, **kw))


def _logits_and_features(model):
    return jit(lambda v, x: (model.apply(v, x, train=False),
                             model.apply(v, x, train=False, features=True)))  # fmt: skip


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(SLAB_PARAMS))
def test_official_parameter_counts(name):
    assert _count(_abstract(name)["params"]) == SLAB_PARAMS[name]


def test_pvt_constructor_default_spatial_reduction_count():
    # slab_pvt_tiny() with the constructor's own la_sr_ratios='8421' (counted with torch).
    v = _abstract("slab_pvt_tiny", sr_ratios=(8, 4, 2, 1))
    assert _count(v["params"]) == 13_353_218
    attn = v["params"]["block1_0"]["attn"]
    assert attn["sr"]["kernel"].shape == (8, 8, 64, 64)
    assert attn["pos_emb"].shape == (56 * 56 // 64, 64)


def test_swin_tiny_softmax_and_sla_blocks():
    model = create_model("slab_swin_tiny")
    layout = model.block_layout()
    # cfgs/slab_swin_t.yaml: window 56, LLSS -> SLA over the whole 56x56 / 28x28 maps, softmax
    # in 7x7 shifted windows in stage 3, softmax over the 7x7 map in stage 4.
    assert layout[0] == [("L", 56, 0)] * 2
    assert layout[1] == [("L", 28, 0)] * 2
    assert layout[2] == [("S", 7, 0), ("S", 7, 3)] * 3
    assert layout[3] == [("S", 7, 0)] * 2
    p = _abstract("slab_swin_tiny")["params"]
    for i, stage in enumerate(layout):
        for j, (kind, win, _) in enumerate(stage):
            attn = p[f"layers{i}_blocks{j}"]["attn"]
            if kind == "L":
                assert attn["pos_emb"].shape == (win * win, 96 * 2**i)
                assert "relative_position_bias_table" not in attn
            else:
                heads = (3, 6, 12, 24)[i]
                assert attn["relative_position_bias_table"].shape == ((2 * win - 1) ** 2, heads)
                assert "pos_emb" not in attn


def _perturb(variables, seed):
    """Random running statistics and norm parameters, so that the fold is not trivial."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        names = [getattr(k, "key", "") for k in path]
        if "repbn" in names and jnp.issubdtype(leaf.dtype, jnp.floating):
            if names[-1] == "var":
                leaf = jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
            else:
                leaf = leaf + 0.3 * jax.random.normal(key, leaf.shape)
        out.append(leaf)
    return jax.tree.unflatten(tree, out)


# Two-stage tiny models (the stage count follows len(depths)): PVT with a spatial reduction in
# stage 1, Swin with SLA in shifted 2x2 windows in stage 1 and softmax attention in stage 2.
TINY = {
    "deit": (SLABDeiT, dict(img_size=16, patch_size=4, embed_dim=12, depth=2, num_heads=2)),
    "pvt": (
        SLABPVT,
        dict(
            img_size=16,
            embed_dims=(8, 12),
            num_heads=(1, 2),
            mlp_ratios=(2, 2),
            depths=(1, 1),
            sr_ratios=(2, 1),
        ),
    ),  # fmt: skip
    "swin": (
        SLABSwin,
        dict(
            img_size=16, embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=2, attn_type="LS"
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize(
    ("family", "num_classes"), [("deit", 5), ("deit", 0), ("pvt", 5), ("swin", 5)]
)
def test_deploy_fold_equals_frozen_train_model(family, num_classes):
    cls, kw = TINY[family]
    model = cls(num_classes=num_classes, prepbn_steps=1, **kw)
    size = kw["img_size"]
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    v = jit(model.init)(jax.random.key(1), x)
    # two training calls: lambda reaches 0 (pure RepBN) and the counters move
    train = _jit_apply(model, train=True, mutable=["batch_stats"])
    for _ in range(2):
        y_train, upd = train(v, x)
        v = {**v, **upd}
    stats = v["batch_stats"]
    counter = stats["patch_embed1"]["norm"]["step"] if family == "pvt" else stats["norm"]["step"]
    assert int(counter) == 2
    assert y_train.shape[0] == 2 and (y_train.shape[1] == num_classes or not num_classes)
    v = _perturb(v, seed=2)
    deploy = model.clone(deploy=True)
    y_eval, f_eval = _logits_and_features(model)(v, x)
    folded = fold_slab_model(v, model)
    assert "batch_stats" not in folded
    y_dep, f_dep = _logits_and_features(deploy)(folded, x)
    assert_close(y_dep, y_eval, tol=1e-5)
    assert not np.allclose(np.asarray(y_eval), np.asarray(y_train), atol=1e-3)
    assert_close(f_dep, f_eval, tol=1e-5)  # stage features are unchanged by the fold


@pytest.mark.parametrize("name", sorted(SLAB_PARAMS))
def test_stage_features_shapes_of_presets(name):
    model, x = create_model(name), example_input(name)
    v = _abstract(name)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True), v, x)
    expect = {
        "slab_deit_tiny": [(2, 14, 14, 192)],
        "slab_deit_small": [(2, 14, 14, 384)],
        "slab_pvt_tiny": [(2, 56, 56, 64), (2, 28, 28, 128), (2, 14, 14, 320), (2, 7, 7, 512)],
        "slab_swin_tiny": [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384), (2, 7, 7, 768)],
    }[name]
    assert [f.shape for f in feats] == expect


def test_window_partition_and_mask_against_loops():
    rng = np.random.default_rng(0)
    b, h, w, c, win, shift = 2, 6, 9, 3, 3, 1
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    got = np.asarray(window_partition(jnp.asarray(x), win))
    expect = []
    for bi in range(b):
        for i in range(0, h, win):
            for j in range(0, w, win):
                expect.append(x[bi, i : i + win, j : j + win].reshape(win * win, c))
    np.testing.assert_array_equal(got, np.stack(expect))
    np.testing.assert_array_equal(np.asarray(window_reverse(jnp.asarray(got), win, h, w)), x)
    # mask: tokens of one window may attend iff they come from the same region of the rolled map
    mask = shifted_window_mask(h, w, win, shift)
    region = np.zeros((h, w), int)
    for i in range(h):
        for j in range(w):
            ri = 0 if i < h - win else (1 if i < h - shift else 2)
            rj = 0 if j < w - win else (1 if j < w - shift else 2)
            region[i, j] = 3 * ri + rj
    k = 0
    for i in range(0, h, win):
        for j in range(0, w, win):
            r = region[i : i + win, j : j + win].reshape(-1)
            np.testing.assert_array_equal(mask[k], np.where(r[:, None] == r[None], 0.0, -100.0))
            k += 1


def test_swin_sla_block_shifted_windows_against_loop():
    # deploy (no norms) so the block is: roll -> per-window SLA -> unroll -> + x -> MLP
    h = w = 8
    win, shift, c = 4, 2, 8
    x = jax.random.normal(jax.random.key(0), (2, h * w, c))
    blk = SLABSwinBlock(num_heads=2, input_resolution=(h, w), window_size=win, shift_size=shift,
                        deploy=True)  # fmt: skip
    v = jit(blk.init)(jax.random.key(1), x)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), v)
    y = jit(blk.apply)(v, x)
    attn = SimplifiedLinearAttention(2, kernel_size=5)
    p = v["params"]
    one_window = jit(lambda tok: attn.apply({"params": p["attn"]}, tok, (win, win)))
    xn = np.roll(np.asarray(x).reshape(2, h, w, c), (-shift, -shift), axis=(1, 2))
    mixed = np.zeros_like(xn)
    for bi in range(2):
        for i in range(0, h, win):
            for j in range(0, w, win):
                tok = xn[bi : bi + 1, i : i + win, j : j + win].reshape(1, win * win, c)
                out = one_window(jnp.asarray(tok))
                mixed[bi, i : i + win, j : j + win] = np.asarray(out).reshape(win, win, c)
    r = np.asarray(x) + np.roll(mixed, (shift, shift), axis=(1, 2)).reshape(2, h * w, c)
    hid = jax.nn.gelu(r @ p["fc1"]["kernel"] + p["fc1"]["bias"][None, None], approximate=False)
    expect = r + hid @ p["fc2"]["kernel"] + p["fc2"]["bias"][None, None]
    assert_close(y, expect, tol=1e-5)
    # a map no larger than the window: the official rule drops the shift (global SLA)
    blk2 = SLABSwinBlock(num_heads=2, input_resolution=(h, w), window_size=8, shift_size=4,
                         deploy=True)  # fmt: skip
    v2 = jax.eval_shape(blk2.init, jax.random.key(1), x)
    assert v2["params"]["attn"]["pos_emb"].shape == (64, c)


def test_pvt_linear_resize_matches_half_pixel_interpolation():
    v = jax.random.normal(jax.random.key(0), (1, 4, 2))
    out = np.asarray(linear_resize_tokens(v, 8))
    vv = np.asarray(v)[0]
    for i in range(8):
        s = max((i + 0.5) * 0.5 - 0.5, 0.0)
        i0 = min(int(np.floor(s)), 3)
        i1 = min(i0 + 1, 3)
        np.testing.assert_allclose(out[0, i], vv[i0] * (1 - (s - i0)) + vv[i1] * (s - i0),
                                   rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("family", sorted(TINY))
def test_bad_input_raises(family):
    cls, kw = TINY[family]
    model = cls(num_classes=3, **kw)
    size = kw["img_size"]
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)

    def run(shape):
        bad = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, bad)

    with pytest.raises(ValueError, match="img_size"):  # not the size of the initialised params
        run((1, size + 8, size + 8, 3))
    with pytest.raises(ValueError, match="multiple of the total stride"):
        run((1, size + 1, size + 1, 3))
    with pytest.raises(ValueError, match="square"):
        run((1, size, size + 8, 3))
    with pytest.raises(ValueError, match="in_chans"):
        run((1, size, size, 4))
    with pytest.raises(ValueError, match="NHWC"):
        run((size, size, 3))


def test_bad_config_raises():
    x = jnp.ones((1, 32, 32, 3))
    with pytest.raises(ValueError, match="attn_type"):
        SLABSwin(num_classes=2, img_size=32, embed_dim=8, num_heads=(1, 1, 1, 1),
                 depths=(1, 1, 1, 1), attn_type="LLX").init(jax.random.key(0), x)  # fmt: skip
    with pytest.raises(ValueError, match="sr_ratios"):
        SLABPVT(num_classes=2, img_size=32, embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1),
                depths=(1, 1, 1, 1), sr_ratios=(1, 1)).init(jax.random.key(0), x)  # fmt: skip


def test_prepbn_schedule_driven_by_step():
    cls, kw = TINY["deit"]
    model = cls(num_classes=3, **kw)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    v = jit(model.init)(jax.random.key(1), x)
    run = jit(lambda v, x, t: model.apply(v, x, train=True, step=t, mutable=["batch_stats"]))
    y0, u = run(v, x, 0)  # lambda = 1: every norm is its LayerNorm
    y1, _ = run(v, x, 10**6)  # lambda = 0: every norm is RepBN
    assert int(u["batch_stats"]["norm"]["step"]) == 0  # the explicit step leaves counters alone
    assert not np.allclose(np.asarray(y0), np.asarray(y1))


@pytest.mark.torch
def test_pvt_linear_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    v = jax.random.normal(jax.random.key(0), (2, 9, 5))
    ours = np.asarray(linear_resize_tokens(v, 36))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(v)).permute(0, 2, 1), size=36, mode="linear"
    ).permute(0, 2, 1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_pvt_block_matches_official_structure_in_torch():
    """SLABPVTBlock (eval, sr 2) vs the official slab_pvt.py Block re-expressed in torch."""
    torch = pytest.importorskip("torch")
    from jaxblocks.blocks.slab import SLABPVTBlock

    tnn = torch.nn
    b, hw, c, heads, sr = 2, 4, 8, 2, 2
    d = c // heads

    class TorchRepBN(tnn.Module):  # RepBN in eval: BN(x) + alpha * x
        def __init__(self):
            super().__init__()
            self.alpha = tnn.Parameter(torch.ones(1))
            self.bn = tnn.BatchNorm1d(c)

        def forward(self, x):
            return (self.bn(x.transpose(1, 2)) + self.alpha * x.transpose(1, 2)).transpose(1, 2)

    class TorchSLA(tnn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv, self.proj = tnn.Linear(c, c), tnn.Linear(c, 2 * c), tnn.Linear(c, c)
            self.sr = tnn.Conv2d(c, c, sr, stride=sr)
            self.norm = TorchRepBN()
            self.dwc = tnn.Conv2d(d, d, 5, groups=d, padding=2)
            self.positional_encoding = tnn.Parameter(torch.zeros(1, hw * hw // sr**2, c))

        def forward(self, x):
            n = x.shape[1]
            q = self.q(x)
            x_ = self.sr(x.permute(0, 2, 1).reshape(b, c, hw, hw)).reshape(b, c, -1)
            kv = self.kv(self.norm(x_.permute(0, 2, 1))).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
            k, v = kv[0], kv[1]
            k = torch.relu(k + self.positional_encoding)
            q = torch.relu(q)

            def split(t):  # b n (h c) -> (b h) n c
                return (
                    t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)
                )

            q, k, v = split(q), split(k), split(v)
            z = 1 / (torch.einsum("bic,bc->bi", q, k.sum(1)) + 1e-6)
            out = torch.einsum("bic,bcd,bi->bid", q, torch.einsum("bjc,bjd->bcd", k, v), z)
            v = tnn.functional.interpolate(v.permute(0, 2, 1), size=n, mode="linear")
            fm = self.dwc(v.reshape(b * heads, d, hw, hw)).reshape(b * heads, d, n).permute(0, 2, 1)
            out = (out + fm).reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, c)
            return self.proj(out)

    class TorchBlock(tnn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2 = TorchRepBN(), TorchSLA(), TorchRepBN()
            self.fc1, self.fc2 = tnn.Linear(c, 4 * c), tnn.Linear(4 * c, c)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(tnn.functional.gelu(self.fc1(self.norm2(x))))

    x = jax.random.normal(jax.random.key(0), (b, hw * hw, c))
    blk = SLABPVTBlock(num_heads=heads, sr_ratio=sr)
    v = jit(lambda x: blk.init(jax.random.key(1), x, (hw, hw), train=True))(x)
    v = _perturb(v, seed=3)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape)
                     if a.dtype == jnp.float32 else a, v)  # fmt: skip
    v = {**v, "batch_stats": jax.tree.map(jnp.abs, v["batch_stats"])}
    y = jit(lambda v, x: blk.apply(v, x, (hw, hw), train=False))(v, x)

    ref = TorchBlock().eval()
    p, s = v["params"], v["batch_stats"]

    def t(a, *perm):
        a = torch.from_numpy(np.array(a, np.float32))
        return a.permute(*perm) if perm else a

    def load_repbn(mod, pp, ss):
        mod.alpha.copy_(t(pp["repbn"]["alpha"]).reshape(1))
        mod.bn.weight.copy_(t(pp["repbn"]["scale"]))
        mod.bn.bias.copy_(t(pp["repbn"]["bias"]))
        mod.bn.running_mean.copy_(t(ss["repbn"]["mean"]))
        mod.bn.running_var.copy_(t(ss["repbn"]["var"]))

    def load_dense(mod, pp):
        mod.weight.copy_(t(pp["kernel"], 1, 0))
        mod.bias.copy_(t(pp["bias"]))

    with torch.no_grad():
        load_repbn(ref.norm1, p["norm1"], s["norm1"])
        load_repbn(ref.norm2, p["norm2"], s["norm2"])
        load_repbn(ref.attn.norm, p["attn"]["norm"], s["attn"]["norm"])
        for name in ("q", "kv", "proj"):
            load_dense(getattr(ref.attn, name), p["attn"][name])
        load_dense(ref.fc1, p["fc1"])
        load_dense(ref.fc2, p["fc2"])
        ref.attn.sr.weight.copy_(t(p["attn"]["sr"]["kernel"], 3, 2, 0, 1))
        ref.attn.sr.bias.copy_(t(p["attn"]["sr"]["bias"]))
        ref.attn.dwc.weight.copy_(t(p["attn"]["dwc"]["kernel"], 3, 2, 0, 1))
        ref.attn.dwc.bias.copy_(t(p["attn"]["dwc"]["bias"]))
        ref.attn.positional_encoding.copy_(t(p["attn"]["pos_emb"])[None])
        expect = ref(t(x)).numpy()
    assert_close(y, expect, tol=1e-5)
