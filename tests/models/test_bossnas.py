"""BossNet / HyTra supernet (arXiv 2103.12424): forward, stage features, supernet path ==
stand-alone BossNet, bad paths, parameter count and a torch rebuild of the official BossNet."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.bossnas import BOSSNET_T0_ENCODING, extract_path
from jaxblocks.registry import create_model, model_info
from tests.blocks.test_bossnas import (
    jit,
    random_variables,
    resatt_names,
    resconv_names,
    to_torch,
    torch_modules,
)

TINY = dict(model_info("bossnet_t0").tiny)
SUPER_TINY = dict(model_info("hytra_supernet").tiny)


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_tiny_forward_and_features():
    model = create_model("bossnet_t0", **TINY)
    x = _rand(0, (2, 32, 32, 3))
    v = random_variables(model, x)
    logits = jit(functools.partial(model.apply, train=False))(v, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 64), (2, 4, 4, 64), (2, 2, 2, 64), (2, 1, 1, 128)]


def test_supernet_path_equals_bossnet():
    net = create_model("hytra_supernet", **SUPER_TINY)
    x = _rand(1, (2, 32, 32, 3))
    v = random_variables(net, x)
    assert len([k for k in v["params"] if k.startswith("layer")]) == len(net.candidates()) == 24
    for path in [((1,), (0,), (), ()), ((), (0, 1), (), ()), ((0,), (), (), (1,))]:
        got = jit(functools.partial(net.apply, train=False, path=path))(v, x)
        fixed = create_model("bossnet_t0", **{**TINY, "encoding": path})
        want = jit(functools.partial(fixed.apply, train=False))(extract_path(v, path), x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="path .* has 3 blocks; the supernet has num_layers=2"):
        net.apply(v, x, train=False, path=((1,), (1,), (1,), ()))
    with pytest.raises(ValueError, match="path must be 4 tuples"):
        net.apply(v, x, train=False, path=((2,), (1,), (), ()))
    with pytest.raises(ValueError, match="path must be 4 tuples"):
        create_model("bossnet_t0", encoding=((1,), (1,)))


def test_param_count_t0():
    model = create_model("bossnet_t0")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    assert n == model_info("bossnet_t0").published_params == 38_415_960  # paper: 38.4M


@pytest.mark.torch
def test_official_param_count_and_tiny_model_match_torch():
    torch, _, _, bossnet = torch_modules()
    official = bossnet(BOSSNET_T0_ENCODING)
    assert sum(p.numel() for p in official.parameters()) == 38_415_960
    enc = ((1,), (0,), (), (0, 1))  # an empty stage, both candidates, both shortcuts
    model = create_model("bossnet_t0", **{**TINY, "encoding": enc})
    x = _rand(2, (2, 32, 32, 3))
    v = random_variables(model, x)
    got = jit(functools.partial(model.apply, train=False))(v, x)
    ref = bossnet(
        enc, channels=TINY["channels"], stem=16, heads=TINY["heads"], dim_head=8, num_classes=10
    )
    names = {"0": "conv1", "1": "bn1", "6": "stage2/conv", "7": "stage2/bn", "13": "fc"}
    names.update(resconv_names("4.", "blocks_0/"))
    names.update(resatt_names("5.", "blocks_1/"))
    names.update(resatt_names("9.", "blocks_2/"))
    names.update(
        {k: n for k, n in resconv_names("10.", "blocks_3/").items() if "downsample" not in k}
    )
    ref = to_torch(ref, v, names)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
