"""Normalization layers in a ResNet-18: training-step time and XLA temp memory vs BatchNorm.

Each variant is the same CIFAR-style ResNet-18 (3×3 stem, stages 64-128-256-512, two basic
blocks each) with every BatchNorm+ReLU swapped for the layer under test; one jitted
``value_and_grad`` step (forward, backward, running-statistic updates; no optimizer) is timed.
A second table times the test-time forward of BatchNorm (running statistics), test-time BN
(batch statistics) and UnMix-TNS (K = 16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.common import measure, table
from jaxblocks.layers import norm as N
from jaxblocks.layers.unmix_tns import unmix_tns_apply, unmix_tns_init_state


class _NormAct(nn.Module):
    """One norm (+ ReLU unless the norm has its own activation) by variant name."""

    variant: str
    act: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        v, ura = self.variant, not train
        g = min(32, x.shape[-1])
        relu = nn.relu if self.act else (lambda h: h)
        if v == "batchnorm":
            return relu(nn.BatchNorm(momentum=0.9)(x, use_running_average=ura))
        if v == "ghost_bn":
            return relu(N.GhostBatchNorm(ghost_batch_size=4, momentum=0.9)(x, ura))
        if v == "evonorm_b0":  # the layer is norm + activation; affine only where no act
            return N.EvoNormB0(apply_act=self.act)(x, ura)
        if v == "evonorm_s0":
            return N.EvoNormS0(groups=32, apply_act=self.act)(x)
        if v == "ws_bcn":
            return relu(N.BatchChannelNorm(num_groups=g)(x, ura))
        if v == "powernorm":
            return relu(N.PowerNorm(warmup_steps=0, group_num=None)(x, ura))
        if v == "repbn":
            return relu(N.RepBN()(x, ura))
        if v == "prepbn":
            return relu(N.PRepBN(total_steps=1000)(x, ura))
        if v == "groupnorm":
            return relu(nn.GroupNorm(num_groups=g)(x))
        if v == "layernorm":
            return relu(nn.LayerNorm()(x))
        raise ValueError(f"unknown variant {v!r}")


class _ResNet18(nn.Module):
    variant: str
    width: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        conv_cls = N.WSConv if self.variant == "ws_bcn" else nn.Conv
        conv = functools.partial(conv_cls, use_bias=False)
        na = functools.partial(_NormAct, self.variant)
        x = na()(conv(self.width, (3, 3))(x), train)
        for i in range(4):
            f = self.width * 2**i
            for j in range(2):
                s = 2 if i > 0 and j == 0 else 1
                y = na()(conv(f, (3, 3), strides=s)(x), train)
                y = na(act=False)(conv(f, (3, 3))(y), train)
                if s != 1 or x.shape[-1] != f:
                    x = na(act=False)(conv(f, (1, 1), strides=s)(x), train)
                x = nn.relu(x + y)
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


VARIANTS = (
    "batchnorm",
    "ghost_bn",
    "evonorm_b0",
    "evonorm_s0",
    "ws_bcn",
    "powernorm",
    "repbn",
    "prepbn",
    "groupnorm",
    "layernorm",
)


def _train_step(model: nn.Module, variables: dict) -> tuple[Callable, tuple]:
    diff = {k: v for k, v in variables.items() if k in ("params", N.POWER_NORM_BACKWARD_COLLECTION)}
    rest = {k: v for k, v in variables.items() if k not in diff}

    def step(diff, rest, x, y):
        def loss(diff):
            logits, upd = model.apply({**diff, **rest}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(diff)
        return l, g, upd

    return step, (diff, rest)


def run(quick: bool) -> str:
    batch, size, width = (8, 8, 16) if quick else (8, 16, 64)
    iters = 3 if quick else 10
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jnp.arange(batch) % 10
    case = f"ResNet-18 w{width}, {batch}×{size}²×3, fp32 train step"
    rows = []
    for v in VARIANTS:
        model = _ResNet18(v, width=width)
        variables = model.init(jax.random.key(1), x, train=True)
        step, (diff, rest) = _train_step(model, variables)
        rows.append(measure(case, v, step, (diff, rest, x, y), warmup=1, iters=iters))
    out = [table(rows, baseline="batchnorm")]

    # Test-time forward: BN eval / test-time BN / UnMix-TNS on the BatchNorm model.
    model = _ResNet18("batchnorm", width=width)
    variables = model.init(jax.random.key(1), x, train=True)
    state = unmix_tns_init_state(variables["batch_stats"], 16, key=jax.random.key(2))
    case_t = f"ResNet-18 w{width}, {batch}×{size}²×3, fp32 inference forward"
    bn_eval = lambda v, x: model.apply(v, x, train=False)
    tbn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    unmix = lambda v, s, x: unmix_tns_apply(model, v, s, x, train=False)
    rows_t = [
        measure(case_t, "bn_running_stats", bn_eval, (variables, x), warmup=1, iters=iters),
        measure(case_t, "test_time_bn", tbn, (variables, x), warmup=1, iters=iters),
        measure(case_t, "unmix_tns_k16", unmix, (variables, state, x), warmup=1, iters=iters),
    ]
    out.append(table(rows_t, baseline="bn_running_stats"))
    note = (
        "CPU timings on a shared machine: ratios only, and only within one table. "
        "EvoNorm replaces BN+ReLU (affine-only where the block has no activation); ws_bcn "
        "also swaps every conv for WSConv; powernorm differentiates its ν state too."
    )
    return "\n\n".join(out + [note])
