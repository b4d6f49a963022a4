"""Sharded training equals single-device training; rules, SBP and mesh errors."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxblocks.train import loop
from jaxblocks.train import sharding as shd
from tests.train.helpers import run_steps, tiny_config

MESHES = [
    {"data": 8},
    {"data": 1, "fsdp": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
]


@pytest.fixture(scope="module")
def mlp_single_device():
    return run_steps(tiny_config("mlp_tiny", mesh={"data": -1}), 4, jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_losses_match_single_device(mesh, mlp_single_device):
    losses, _ = run_steps(tiny_config("mlp_tiny", mesh=mesh), 4)
    np.testing.assert_allclose(losses, mlp_single_device, rtol=2e-5, atol=2e-6)
    assert losses[-1] < losses[0] + 0.5  # it trains (not a constant)


def test_batchnorm_is_global_under_data_sharding():
    # BN statistics over the global batch: 8-way data parallel == 1 device.
    one, s1 = run_steps(tiny_config("cnn_tiny", mesh={"data": -1}), 3, jax.devices()[:1])
    eight, s8 = run_steps(tiny_config("cnn_tiny", mesh={"data": 8}), 3)
    np.testing.assert_allclose(eight, one, rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_param_and_batch_shardings_follow_rules():
    cfg = tiny_config("mlp_tiny", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    cfg.model.kwargs.hidden = (64,)
    tr = loop.build(cfg)
    state, sh, _ = tr.create_state()
    k = state.params["dense0"]["kernel"]
    assert k.sharding.spec == P("fsdp", "tensor")
    assert state.params["head"]["kernel"].sharding.spec == P("tensor", None)
    # SGD momentum follows its parameter.
    mom = jax.tree.leaves(state.opt_state)
    assert any(getattr(m, "shape", ()) == k.shape and m.sharding.spec == k.sharding.spec
               for m in mom)  # fmt: skip
    b = shd.batch_sharding(tr.mesh, 4)
    assert b.spec == P(("data", "fsdp"), None, None, None)
    assert state.step.sharding.spec == P()


def test_mesh_shape_errors():
    assert shd.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
    with pytest.raises(ValueError, match="not divisible"):
        shd.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="multiply to"):
        shd.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axis"):
        shd.mesh_shape({"model": 2}, 8)
    mesh = shd.make_mesh({"data": 4, "fsdp": 2})
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_batch_not_divisible_by_data_axis_is_a_clear_error():
    cfg = tiny_config("mlp_tiny", mesh={"data": 8}, batch_size=36)
    with pytest.raises(ValueError, match="not divisible by the data-parallel mesh size"):
        loop.build(cfg)


def test_sbp_signatures():
    spec, partial = shd.sbp_to_pspec({"data": shd.split(0), "tensor": shd.split(1)}, 2)
    assert spec == P("data", "tensor") and partial == frozenset()
    spec, partial = shd.sbp_to_pspec(
        {"data": shd.split(0), "fsdp": shd.split(0), "tensor": shd.partial_sum}, 3
    )
    assert spec == P(("data", "fsdp")) and partial == {"tensor"}
    spec, _ = shd.sbp_to_pspec({"data": shd.broadcast, "tensor": shd.split(-1)}, 2)
    assert spec == P(None, "tensor")
    back = shd.pspec_to_sbp(P("data", "tensor"), shd.MESH_AXES)
    assert back["data"] == shd.split(0) and back["fsdp"] == shd.broadcast
    with pytest.raises(ValueError, match="out of range"):
        shd.sbp_to_pspec({"data": shd.split(2)}, 2)
    with pytest.raises(ValueError):
        shd.SBP("split")
    # The spec really places the data: split(0) over data on 8 devices = 8 row blocks.
    mesh = shd.make_mesh({"data": 8})
    spec, _ = shd.sbp_to_pspec({"data": shd.split(0)}, 2)
    x = jax.device_put(np.arange(16.0).reshape(8, 2), jax.sharding.NamedSharding(mesh, spec))
    assert {s.data.shape for s in x.addressable_shards} == {(1, 2)}
