"""ConvBN modes: one training step of ResNet-50 and MobileNetV2 in train/eval/tune/deploy.

"Efficient ConvBN Blocks for Transfer Learning and Beyond" (https://arxiv.org/abs/2305.11624):
tune mode should match eval mode's outputs and gradients at deploy mode's memory and time.

One step is ``jax.jit(jax.grad(loss))`` w.r.t. the params (softmax cross-entropy, random labels;
train mode also returns the updated batch statistics). Reported per model, dtype and mode: XLA
temp memory (compiled memory analysis), XLA FLOPs, and the median CPU step time, with ratios to
eval. Two ablation rows separate the paper's fold from this library's backward-memory measures
(lean ReLU that keeps its output, late weight-gradient layout copies):

* ``tune (plain fold)``: the fold alone, activations and convs as in eval mode;
* ``eval (lean)``: eval mode with the same backward-memory measures as tune.

``quick``: batch 4 at 64x64. Full: batch 16 at 224x224; on a CPU the step time is measured for
fp32 only (XLA:CPU has no fast bf16 convolution, so bf16 times would say nothing about GPUs),
with few iterations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import Measurement, compile_stats, measure, table
from jaxblocks.layers import conv_bn
from jaxblocks.layers.conv_bn import convbn_mode, fold_for_deploy
from jaxblocks.registry import create_model

MODELS = ("resnet50", "mobilenet_v2")
# (row name, ConvBN mode, lean override: None = the library default for the mode)
ROWS = (
    ("train", "train", None),
    ("eval", "eval", None),
    ("tune", "tune", None),
    ("deploy", "deploy", None),
    ("tune (plain fold)", "tune", False),
    ("eval (lean)", "eval", True),
)


def _step_fn(model, mode: str, lean: bool | None):
    """grad of the cross-entropy w.r.t. params, in ``mode`` (train also returns batch_stats)."""

    def loss(params, rest, x, labels):
        variables = {"params": params, **rest}
        with convbn_mode(mode), conv_bn._LEAN(lean):
            if mode == "train":
                logits, updates = model.apply(variables, x, mutable=["batch_stats"])
            else:
                logits, updates = model.apply(variables, x), {}
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return jnp.mean(ce), updates

    return jax.grad(loss, has_aux=True)


def _variables(name: str, image: int):
    model = create_model(name, num_classes=1000)
    x = jnp.ones((1, image, image, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.key(0), x)


def run(quick: bool) -> str:
    batch, image = (4, 64) if quick else (16, 224)
    iters = 3 if quick else 2
    out = [
        f"One training step `jax.jit(jax.grad(loss))` at batch {batch}, {image}x{image}, "
        f"1000 classes. Ratios are to eval mode of the same model and dtype. Timed rows: "
        f"{'all' if quick else 'fp32'} (median of {iters} steps after a warm-up step)."
    ]
    for name in MODELS:
        variables = _variables(name, image)
        deploy_vars = fold_for_deploy(variables)
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        for dtype in (jnp.float32, jnp.bfloat16):
            model = create_model(name, num_classes=1000, dtype=dtype)
            x = jax.random.normal(jax.random.key(1), (batch, image, image, 3), jnp.float32)
            timed = quick or dtype == jnp.float32
            rows: list[Measurement] = []
            for row, mode, lean in ROWS:
                v = deploy_vars if mode == "deploy" else variables
                rest = {k: val for k, val in v.items() if k != "params"}
                args = (v["params"], rest, x.astype(dtype), labels)
                fn = _step_fn(model, mode, lean)
                case = f"{name} {jnp.dtype(dtype).name}"
                if timed:
                    m = measure(case, row, fn, args, warmup=1, iters=iters)
                else:
                    _, temp, flops = compile_stats(fn, args)
                    m = Measurement(case, row, math.nan, temp, flops)
                rows.append(m)
            dt = jnp.dtype(dtype).name
            out.append(f"\n### {name}, {dt}\n")
            out.append(table(rows, "eval", show_time=timed))
    out.append(NOTES)
    return "\n".join(out)


NOTES = (
    "\nNotes: XLA:CPU memory analysis and CPU times; re-measure peak memory and step time on a "
    "GPU before quoting them for GPUs. `deploy` trains the folded kernel and bias as leaves (no "
    "BN statistics)."
)
