"""RaftMLP blocks (https://arxiv.org/abs/2108.04384): raft token mixing and the RaftMLP block
against a NumPy formulation written in the official flattened layouts (einops patterns of
okojoalg/raft-mlp ``libs/modules.py``), the cross-scale embedding against an explicit NumPy
unfold, the bicubic resize against its definition and (with torch) against
``F.interpolate``/``nn.Unfold``, other grid sizes, and bad-input errors."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.raftmlp import (
    CrossScaleMLPEmbedding,
    PermutedBlock,
    RaftMLPBlock,
    RaftTokenMixingBlock,
    bicubic_resize_matrix,
    from_rafts,
    resize_bicubic,
    to_rafts,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE, static_argnames="module")
_erf = np.vectorize(math.erf)


@jit
def _apply(variables, x, module):
    return module.apply(variables, x)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _mlp(x, p):
    h = _gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _random_params(module, x, seed):
    """float64 NumPy params drawn on the abstract structure (no real init): kernels with
    variance 1/fan_in, LayerNorm scale/bias moved off 1/0 so their order matters."""
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, a):
        z = rng.standard_normal(a.shape)
        if path[-1].key == "kernel":
            return z / np.sqrt(a.shape[0])
        return (1.0 if path[-1].key == "scale" else 0.0) + 0.3 * z

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _f32(p):
    return {"params": jax.tree.map(jnp.float32, p)}


def _rel(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - b) ** 2)) / np.sqrt(np.mean(b**2)))


# -------------------------------------------------- NumPy formulation in the official layouts


def _np_permuted(xf, p, length, r):
    """Official ``PermutedBlock`` on ``xf = [B, (c1 o1), (c2 o2)]`` (c1 = C/r, c2 = r, o2 =
    length): LayerNorm(C) after ``b (c1 o1) (c2 o2) -> b (o1 o2) (c1 c2)``, MLP, residual."""
    b, rows, _ = xf.shape
    co = p["norm"]["scale"].shape[0] // r
    o1 = rows // co
    t = xf.reshape(b, co, o1, r, length).transpose(0, 2, 4, 1, 3).reshape(b, o1 * length, co * r)
    t = _ln(t, p["norm"])
    t = t.reshape(b, o1, length, co, r).transpose(0, 3, 1, 4, 2).reshape(b, co * o1, r * length)
    return xf + _mlp(t, p["mlp"])


def _np_token_mixing(x, p, r):
    """RaftShrink → PermutedBlock(ph) → Rearrange → PermutedBlock(pw) → RaftExpansion."""
    b, h, w, c = x.shape
    co = c // r
    # b (h w) (chw co) -> b (co w) (chw h)
    t = x.reshape(b, h, w, r, co).transpose(0, 4, 2, 3, 1).reshape(b, co * w, r * h)
    t = _np_permuted(t, p["vertical"], h, r)
    # b (co w) (chw h) -> b (co h) (chw w)
    t = t.reshape(b, co, w, r, h).transpose(0, 1, 4, 3, 2).reshape(b, co * h, r * w)
    t = _np_permuted(t, p["horizontal"], w, r)
    # b (co h) (chw w) -> b (h w) (chw co)
    return t.reshape(b, co, h, r, w).transpose(0, 2, 4, 3, 1).reshape(b, h, w, c)


def _np_bicubic_1d(n_in, n_out, a=-0.75):
    """torch's upsample_bicubic2d weights, tap by tap from its source (independent of the
    module's vectorised form only in style: the definition is the same)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        t = src - f
        for idx, d in zip(range(f - 1, f + 3), (t + 1, t, 1 - t, 2 - t), strict=True):
            d = abs(d)
            if d <= 1:
                wgt = (a + 2) * d**3 - (a + 3) * d**2 + 1
            else:
                wgt = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            m[i, min(max(idx, 0), n_in - 1)] += wgt
    return m


def _np_resize(x, size):
    mh, mw = _np_bicubic_1d(x.shape[1], size[0]), _np_bicubic_1d(x.shape[2], size[1])
    return np.einsum("oh,bhwc->bowc", mh, np.einsum("pw,bhwc->bhpc", mw, x))


def _np_unfold(x, k, s):
    """``nn.Unfold(k, stride=s, padding=(k - s) // 2)`` on NHWC: ``[B, h, w, C·k·k]`` in
    ``(C, kh, kw)`` order."""
    pad = (k - s) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    b, hp, wp, c = xp.shape
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    out = np.zeros((b, ho, wo, c, k, k))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * s : i * s + k, j * s : j * s + k, :]  # [B, k, k, C]
            out[:, i, j] = patch.transpose(0, 3, 1, 2)
    return out.reshape(b, ho, wo, c * k * k)


# ----------------------------------------------------------------------------------- tests


def test_raft_layout_is_the_official_one():
    b, h, w, r, co = 2, 3, 5, 2, 4
    x = np.asarray(jax.random.normal(jax.random.key(0), (b, h, w, r * co)))
    v = np.asarray(to_rafts(jnp.asarray(x), r, "vertical"))
    assert v.shape == (b, w, co, r * h)
    # row (w, j), feature k·H + h holds channel k·(C/r) + j at (h, w)
    for hh, ww, k, j in [(0, 0, 0, 0), (2, 4, 1, 3), (1, 3, 0, 2), (2, 1, 1, 0)]:
        assert v[1, ww, j, k * h + hh] == x[1, hh, ww, k * co + j]
    hz = np.asarray(to_rafts(jnp.asarray(x), r, "horizontal"))
    assert hz.shape == (b, h, co, r * w)
    for hh, ww, k, j in [(0, 0, 0, 0), (2, 4, 1, 3), (1, 3, 0, 2)]:
        assert hz[1, hh, j, k * w + ww] == x[1, hh, ww, k * co + j]
    for axis, t in (("vertical", v), ("horizontal", hz)):
        np.testing.assert_array_equal(from_rafts(jnp.asarray(t), r, axis, x.shape), x)


@pytest.mark.parametrize("raft_size", [2, 3])
def test_raft_token_mixing_matches_numpy(raft_size):
    h, w, c = 3, 5, 6
    x = jax.random.normal(jax.random.key(0), (2, h, w, c))
    mix = RaftTokenMixingBlock(height=h, width=w, raft_size=raft_size, expansion=2)
    p = _random_params(mix, x, seed=raft_size)
    assert p["vertical"]["mlp"]["fc1"]["kernel"].shape == (raft_size * h, 2 * raft_size * h)
    assert p["horizontal"]["mlp"]["fc1"]["kernel"].shape == (raft_size * w, 2 * raft_size * w)
    assert p["vertical"]["norm"]["scale"].shape == (c,)
    y = _apply(_f32(p), x, mix)
    want = _np_token_mixing(np.asarray(x, np.float64), p, raft_size)
    assert _rel(y, want) < 1e-5
    # the LayerNorm affine parameters are in the official raft-major order: reading them in
    # the tokens' channel order gives another result when r > 1
    if raft_size > 1:
        q = jax.tree.map(lambda a: a, p)
        for part in ("vertical", "horizontal"):
            for name in ("scale", "bias"):
                a = p[part]["norm"][name]
                q[part]["norm"][name] = a.reshape(raft_size, -1).T.reshape(-1)
        assert _rel(y, _np_token_mixing(np.asarray(x, np.float64), q, raft_size)) > 1e-3


def test_block_matches_numpy_on_and_off_the_training_grid():
    block = RaftMLPBlock(height=4, width=4, raft_size=2, token_expansion=2, channel_expansion=3)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    p = _random_params(block, x, seed=3)

    def np_block(x64):
        t = _np_resize(x64, (4, 4)) if x64.shape[1:3] != (4, 4) else x64
        t = _np_token_mixing(t, p["token_mixing"], 2)
        t = _np_resize(t, x64.shape[1:3]) if x64.shape[1:3] != (4, 4) else t
        cm = p["channel_mixing"]
        return t + _mlp(_ln(t, cm["norm"]), cm["mlp"])

    for shape in [(2, 4, 4, 6), (2, 3, 7, 6)]:  # the training grid; smaller H, larger W
        xs = jax.random.normal(jax.random.key(shape[1]), shape)
        y = _apply(_f32(p), xs, block)
        assert y.shape == shape
        assert _rel(y, np_block(np.asarray(xs, np.float64))) < 1e-5, shape


def test_bicubic_resize_is_torch_bicubic_by_definition():
    for n_in, n_out in [(4, 7), (7, 4), (5, 5), (1, 3), (3, 1), (56, 23)]:
        m = bicubic_resize_matrix(n_in, n_out)
        np.testing.assert_allclose(m, _np_bicubic_1d(n_in, n_out), atol=1e-12)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # constants are kept
    np.testing.assert_array_equal(bicubic_resize_matrix(5, 5), np.eye(5))
    x = jax.random.normal(jax.random.key(0), (1, 5, 6, 2))
    assert resize_bicubic(x, (5, 6)) is x
    np.testing.assert_allclose(
        resize_bicubic(x, (3, 9)), _np_resize(np.asarray(x, np.float64), (3, 9)), atol=1e-5
    )


@pytest.mark.parametrize(("kernels", "size"), [((4, 8), 16), ((2, 4), 6), ((2,), 4)])
def test_cross_scale_embedding_matches_numpy_unfold(kernels, size):
    emb = CrossScaleMLPEmbedding(features=5, kernels=kernels)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    p = _random_params(emb, x, seed=0)
    assert p["kernel"].shape == (3 * sum(k * k for k in kernels), 5)
    y = _apply(_f32(p), x, emb)
    x64 = np.asarray(x, np.float64)
    s = min(kernels)
    patches = np.concatenate([_np_unfold(x64, k, s) for k in kernels], axis=-1)
    want = patches @ p["kernel"] + p["bias"]
    assert y.shape == (2, size // s, size // s, 5)
    assert _rel(y, want) < 1e-5


def test_bad_inputs_are_value_errors():
    key = jax.random.key(0)

    def init(module, shape):  # traced only: the checks run at trace time
        return jax.eval_shape(module.init, key, jnp.ones(shape))

    mix = RaftTokenMixingBlock(height=4, width=4, raft_size=2)
    variables = init(mix, (1, 4, 4, 6))
    with pytest.raises(ValueError, match=r"token grid \(3, 4\).*\(height, width\)=\(4, 4\)"):
        jax.eval_shape(mix.apply, variables, jnp.ones((1, 3, 4, 6)))
    with pytest.raises(ValueError, match=r"shape \(4, 4, 6\) \(rank 3\)"):
        jax.eval_shape(mix.apply, variables, jnp.ones((4, 4, 6)))
    with pytest.raises(ValueError, match=r"width 5.*length=4"):
        init(PermutedBlock(length=4, raft_size=2, axis="horizontal"), (1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"channels=6 must be divisible by raft_size=4"):
        init(RaftMLPBlock(height=4, width=4, raft_size=4), (1, 4, 4, 6))
    with pytest.raises(ValueError, match=r"drop_path=1.5"):
        init(RaftMLPBlock(height=4, width=4, drop_path=1.5), (1, 4, 4, 6))
    with pytest.raises(ValueError, match=r"shape \(1, 10, 12, 3\).*multiples of the stride"):
        init(CrossScaleMLPEmbedding(features=4, kernels=(4, 8)), (1, 10, 12, 3))
    with pytest.raises(ValueError, match=r"first must be the smallest"):
        init(CrossScaleMLPEmbedding(features=4, kernels=(8, 4)), (1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(k - 3\) even, got k=6"):
        init(CrossScaleMLPEmbedding(features=4, kernels=(3, 6)), (1, 9, 9, 3))


def test_drop_path_follows_deterministic_flag():
    block = RaftMLPBlock(height=4, width=4, raft_size=2, drop_path=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 6))
    variables = _f32(_random_params(block, x, seed=0))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(key):
        y_eval = block.apply(variables, x)
        drop = lambda k: block.apply(variables, x, deterministic=False, rngs={"dropout": k})  # noqa: E731
        return y_eval, drop(key), drop(jax.random.fold_in(key, 1))

    y_eval, a, b = run(jax.random.key(3))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - y_eval))) > 1e-3


@pytest.mark.torch
def test_resize_and_embedding_match_torch():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 5, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    for size in [(4, 4), (11, 9), (7, 3), (1, 2)]:
        want = F.interpolate(xt, size, mode="bicubic", align_corners=False)
        got = resize_bicubic(jnp.asarray(x), size)
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-5)

    kernels = (4, 8)
    img = rng.standard_normal((2, 16, 12, 3)).astype(np.float32)
    emb = CrossScaleMLPEmbedding(features=6, kernels=kernels)
    p = nn.unbox(emb.init(jax.random.key(0), jnp.asarray(img)))["params"]
    fc = torch.nn.Linear(3 * (16 + 64), 6)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
        fc.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        it = torch.from_numpy(img).permute(0, 3, 1, 2)
        # the official CrossScaleMLPEmbedding.forward
        cols = [torch.nn.Unfold(k, stride=4, padding=(k - 4) // 2)(it).transpose(1, 2)
                for k in kernels]  # fmt: skip
        want = fc(torch.cat(cols, dim=2)).reshape(2, 4, 3, 6).numpy()
    np.testing.assert_allclose(emb.apply({"params": p}, jnp.asarray(img)), want, atol=1e-5)
