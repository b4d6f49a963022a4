"""ConAdv with a registry ResNet (ConvBN layers with an auxiliary BatchNorm)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxblocks.train import loop
from tests.train.helpers import conadv_started, tiny_config, to_numpy

RESNET_KW = {"stage_sizes": (1, 1), "width": 4, "stem": "small", "num_classes": 10}


def test_conadv_trains_a_registry_resnet_through_its_auxiliary_batchnorms():
    cfg = tiny_config("resnet18", mesh={"data": 8})
    cfg.model.kwargs = dict(RESNET_KW, aux_bn=True)
    cfg.conadv.enabled = True
    cfg.conadv.epsilon = 0.05
    with conadv_started(cfg) as (tr, steps, state, _):
        before = to_numpy(state)
        losses = []
        for s in range(3):
            state, m = steps["conadv"](state, loop._global_batch(tr, s))
            m = jax.device_get(m)
            losses.append((float(m["loss"]), float(m["adv_loss"])))
        after = to_numpy(state)
    assert np.all(np.isfinite(losses))
    # Every ConvBN's main BN saw the clean batches and its auxiliary BN the adversarial ones.
    stats_b, stats_a = before.batch_stats, after.batch_stats
    for name in ("conv1", "layer1_0", "layer2_0"):
        sub_b, sub_a = stats_b[name], stats_a[name]
        if name != "conv1":
            sub_b, sub_a = sub_b["conv1"], sub_a["conv1"]
        for key in ("var", "var_aux"):
            assert not np.allclose(sub_a[key], sub_b[key]), (name, key)
    # The adversarial inputs of the next batch stay within epsilon of it (FGSM, sign step).
    nxt = np.asarray(jax.device_get(loop._global_batch(tr, 2)["x_next"]))
    np.testing.assert_allclose(np.abs(after.x_adv - nxt).max(), 0.05, rtol=1e-5)


def test_conadv_with_a_resnet_without_aux_bn_fails_clearly():
    cfg = tiny_config("resnet18", mesh={"data": 8})
    cfg.model.kwargs = dict(RESNET_KW)
    cfg.conadv.enabled = True
    with pytest.raises(ValueError, match=r"aux_bn=True"), conadv_started(cfg):
        pass
