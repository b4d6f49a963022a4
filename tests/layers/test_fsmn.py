"""FSMN memory layers: the memory against a direct NumPy convolution, UniDeepFsmn and the
dilated dense FSMN against torch rebuilds of the official modules on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.fsmn import DilatedDenseFsmn, UniDeepFsmn, UniDeepFsmnDilated, fsmn_memory


def _np_memory(p, kernel, dilation):
    b, t, c = p.shape
    k = kernel.shape[0]
    half = (k - 1) // 2
    out = np.zeros_like(p)
    for j in range(k):
        off = (j - half) * dilation
        for s in range(t):
            if 0 <= s + off < t:
                out[:, s] += kernel[j] * p[:, s + off]
    return out


@pytest.mark.parametrize("dilation", [1, 2])
def test_fsmn_memory_matches_direct_convolution(dilation):
    kp, kk = jax.random.split(jax.random.key(0))
    p = jax.random.normal(kp, (2, 11, 5))
    kernel = jax.random.normal(kk, (7, 5))
    got = fsmn_memory(p, kernel, dilation)
    want = _np_memory(np.asarray(p), np.asarray(kernel), dilation)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kernel"):
        fsmn_memory(jnp.ones((1, 4, 3)), jnp.ones((4, 3)))
    layer = UniDeepFsmn(hidden_size=4, lorder=0)
    with pytest.raises(ValueError, match="lorder"):
        layer.init(jax.random.key(0), jnp.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="x must be"):
        UniDeepFsmn(4).init(jax.random.key(0), jnp.ones((4, 3)))


@pytest.mark.torch
def test_unideepfsmn_matches_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c, hid, lorder = 6, 10, 4
    x = jax.random.normal(jax.random.key(1), (2, 13, c))
    layer = UniDeepFsmn(hid, lorder)
    v = layer.init(jax.random.key(2), x)
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), v["params"])
    # Official UniDeepFsmn.forward (fsmn.py), on [B, T, C].
    xt = torch.tensor(np.asarray(x))
    f1 = F.relu(xt @ p["linear"]["kernel"] + p["linear"]["bias"])
    p1 = f1 @ p["project"]["kernel"]
    x_per = p1.unsqueeze(1).permute(0, 3, 2, 1)  # [B, C, T, 1]
    w = p["memory"].T[:, None, :, None]  # conv1 weight [C, 1, 2l-1, 1]
    y = F.pad(x_per, [0, 0, lorder - 1, lorder - 1])
    out = x_per + F.conv2d(y, w, groups=c)
    want = xt + out.permute(0, 3, 2, 1).squeeze(1)
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), want.numpy(), rtol=1e-4, atol=1e-5)


def _torch_dilated_dense(torch, x_per, p, depth, lorder):
    # Official DilatedDenseNet.forward on [B, C, T, 1] with the same weights.
    F = torch.nn.functional
    c = x_per.shape[1]
    skip = x_per
    for i in range(depth):
        dil = 2**i
        pad = lorder + (dil - 1) * (lorder - 1) - 1
        out = F.pad(skip, (0, 0, pad, pad))
        w = p[f"conv{i + 1}"]["kernel"].permute(2, 1, 0)[..., None]  # [C, i+1, K, 1]
        out = F.conv2d(out, w, dilation=(dil, 1), groups=c)
        out = F.instance_norm(out, weight=p[f"norm{i + 1}"]["scale"],
                              bias=p[f"norm{i + 1}"]["bias"], eps=1e-5)  # fmt: skip
        out = F.prelu(out, p[f"prelu{i + 1}"]["negative_slope"])
        skip = torch.cat([out, skip], dim=1)
    return out


@pytest.mark.torch
def test_dilated_fsmn_matches_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c, hid, lorder = 4, 6, 3
    x = jax.random.normal(jax.random.key(3), (2, 17, c))
    layer = UniDeepFsmnDilated(hid, lorder)
    v = layer.init(jax.random.key(4), x)
    # non-trivial norm/PReLU parameters
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), v)
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), v["params"])
    xt = torch.tensor(np.asarray(x))
    p1 = F.relu(xt @ p["linear"]["kernel"] + p["linear"]["bias"]) @ p["project"]["kernel"]
    out = _torch_dilated_dense(torch, p1.unsqueeze(1).permute(0, 3, 2, 1), p["conv"], 2, lorder)
    want = xt + out.permute(0, 3, 2, 1).squeeze(1)
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), want.numpy(), rtol=1e-4, atol=1e-4)
    assert DilatedDenseFsmn(2, lorder).apply({"params": v["params"]["conv"]}, x).shape == x.shape
