"""Ghost BatchNorm under data sharding: groups aligned with the shards need no collectives.

Plain BatchNorm under SPMD ``jit`` reduces over the global batch (an all-reduce per statistic);
with one ghost batch per data shard every reduction stays on its device. This is paper 51's
point for large-batch training, checked on the compiled 8-device program.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxblocks.layers.norm import GhostBatchNorm
from jaxblocks.train.sharding import batch_sharding, make_mesh

BATCH, C = 32, 16


def _compiled_text(module: nn.Module) -> tuple[str, jax.Array]:
    """HLO of the sharded forward, and its output."""
    mesh = make_mesh({"data": 8})
    x = jax.random.normal(jax.random.key(0), (BATCH, 4, 4, C))
    x = jax.device_put(x, batch_sharding(mesh, x.ndim))
    variables = module.init(jax.random.key(1), x[:8])
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)

    def normalize(v, x):
        # The normalized activations only: the running-statistic update and parameter gradients
        # are global reductions by definition; the claim is about the activations' statistics.
        y, _ = module.apply(v, x, mutable=["batch_stats"])
        return y

    f = jax.jit(normalize, out_shardings=batch_sharding(mesh, x.ndim))
    text = f.lower(variables, x).compile().as_text()
    return text, f(variables, x)


def test_ghost_groups_aligned_with_shards_need_no_all_reduce():
    module = GhostBatchNorm(ghost_batch_size=BATCH // 8, use_running_average=False)
    text, y = _compiled_text(module)
    assert "all-reduce" not in text
    # Each shard's ghost batch is normalized by its own statistics.
    per_shard_mean = y.reshape(8, -1, C).mean(axis=1)
    assert float(jnp.abs(per_shard_mean).max()) < 1e-5


@pytest.mark.parametrize("ghost", [BATCH, BATCH // 2])
def test_statistics_across_shards_do_all_reduce(ghost):
    # The same check fails when a ghost batch spans several shards (and for plain BN): it can.
    text, _ = _compiled_text(GhostBatchNorm(ghost_batch_size=ghost, use_running_average=False))
    assert "all-reduce" in text
