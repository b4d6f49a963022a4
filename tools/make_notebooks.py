"""Write the notebooks in notebooks/ from the cells below (this file is their source).

Usage: ``python tools/make_notebooks.py`` rewrites every notebook; ``--check`` only reports the
ones that differ and exits with status 1 if any does. The notebooks are stored without outputs.
`tests/test_notebooks.py` runs each one top to bottom on CPU, checks that it imports only the
public API, and checks that the files are what this script writes.

Rules for the cells (STYLE.md §1): import only the public API; run top to bottom on CPU in CI
(each notebook well under 40 s); assert every claim the text makes, so a regression fails CI;
never change global JAX configuration (the test runs the notebooks in its own process).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

Cell = tuple[str, str]  # (cell type, source)


# Where users install jaxblocks from on Colab: the one place to change when the repository moves.
REPO_URL = "https://github.com/jaxblocks/jaxblocks"

# The first code cell of every notebook: on a machine without jaxblocks (a fresh Colab runtime)
# install it with the extra for the runtime's accelerator; then report the backend. Where the
# package is importable (CI, a local checkout) it installs nothing and touches no network.
INSTALL = f"""
# Setup: install jaxblocks where it is missing (e.g. Colab), with the extra for the runtime.
import importlib.util
import os
import shutil
import subprocess
import sys

if importlib.util.find_spec("jaxblocks") is None:
    env = os.environ
    tpu = env.get("COLAB_TPU_ADDR") or env.get("TPU_NAME") or os.path.exists("/dev/accel0")
    extra = "[tpu]" if tpu else "[gpu]" if shutil.which("nvidia-smi") else ""
    spec = f"jaxblocks{{extra}} @ git+{REPO_URL}"
    print("installing", spec)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", spec])

import jax

print("jax", jax.__version__, "| backend:", jax.default_backend(), "|", jax.devices())
"""


def md(text: str) -> Cell:
    return "markdown", textwrap.dedent(text).strip("\n")


def code(text: str) -> Cell:
    return "code", textwrap.dedent(text).strip("\n")


# ----------------------------------------------------------------------------------------------
# 01: ConvBN Tune mode (paper 1).

CONVBN: list[Cell] = [
    md("""
    # ConvBN in Train, Eval, Tune and Deploy modes

    *Efficient ConvBN Blocks for Transfer Learning and Beyond*, You et al., ICLR 2024
    ([arXiv 2305.11624](https://arxiv.org/abs/2305.11624)).

    A convolution followed by BatchNorm can run in four modes:

    * `train`: conv, then BN with the batch statistics; the running statistics are updated.
      For training from scratch.
    * `eval`: conv, then BN with the running statistics (a per-channel affine). For evaluation
      and classic fine-tuning.
    * `tune` (the paper's proposal): BN with the running statistics folded into the conv weight
      *inside autodiff*. The outputs and gradients of `eval` with less memory: for fine-tuning
      and transfer learning.
    * `deploy`: a plain conv whose weights were folded once (`fold_for_deploy`). For inference.

    In `jaxblocks` every conv+BN pair of a model is a `jaxblocks.layers.ConvBN`, and one context
    manager, `jaxblocks.layers.convbn_mode`, switches the whole model. This notebook builds a small
    ResNet-18 from the registry, trains it for a few steps, then checks the paper's claims:
    tune mode gives the same outputs and gradients as eval mode, deploy gives the same outputs,
    and tune mode's backward pass needs less memory. It runs on CPU in well under a minute.
    """),
    code("""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxblocks
    from jaxblocks.layers import CONVBN_MODES, convbn_mode, fold_for_deploy

    print("ConvBN modes:", CONVBN_MODES)
    """),
    md("""
    ## A ResNet-18 whose every conv is a ConvBN

    `jaxblocks.create_model("resnet18", ...)` builds torchvision's ResNet-18 topology; here with
    base width 16 and the small 3x3 stem (no max-pool) so that it is quick on CPU. The variables
    have a `params` collection (conv kernels, BN scale and bias, the classifier) and a
    `batch_stats` collection (each ConvBN's running `mean` and `var`).
    """),
    code("""
    model = jaxblocks.create_model("resnet18", num_classes=10, width=16, stem="small")

    k_images, k_labels = jax.random.split(jax.random.key(0))
    images = jax.random.normal(k_images, (8, 16, 16, 3))  # NHWC
    labels = jax.random.randint(k_labels, (8,), 0, 10)

    # An "rbg" key for init: on CPU, XLA compiles it in about a third of the time of the default
    # threefry key for this model's ~60 parameter initializers; the model works with either.
    # `nn.unbox` drops the logical axis names (used by the trainer's sharding rules).
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), images))
    params, batch_stats = variables["params"], variables["batch_stats"]

    n_params = sum(p.size for p in jax.tree.leaves(params))
    stat_paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)]
    n_convbn = sum(path[-1].key == "mean" for path in stat_paths)
    print(f"collections: {sorted(variables)}; {n_params:,} parameters; {n_convbn} ConvBN layers")
    print("stem ConvBN params:", jax.tree.map(jnp.shape, params["conv1"]))
    print("stem ConvBN batch_stats:", jax.tree.map(jnp.shape, batch_stats["conv1"]))
    assert sorted(variables) == ["batch_stats", "params"]
    assert n_convbn == 20  # stem + 2 per basic block x 8 blocks + 3 downsample projections
    """),
    md("""
    ## Train mode: batch statistics, running statistics updated

    A plain optax training step. Applying the model with `mode="train"` and
    `mutable=["batch_stats"]` normalizes with the statistics of the batch and returns the updated
    running statistics (Flax convention: `momentum` is the decay, biased variance). We take three
    SGD steps on one batch: the loss goes down and the running statistics leave their initial
    values (mean 0, variance 1).
    """),
    code("""
    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)


    @jax.jit
    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                mode="train",
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, labels), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss


    losses = []
    for step in range(3):
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, images, labels
        )
        losses.append(float(loss))
        print(f"step {step}: loss {losses[-1]:.4f}")

    print("stem running mean (first 4 channels):", batch_stats["conv1"]["mean"][:4])
    assert losses[-1] < losses[0]
    assert not np.allclose(batch_stats["conv1"]["mean"], 0.0)
    assert not np.allclose(batch_stats["conv1"]["var"], 1.0)
    """),
    md("""
    ## Eval and Tune: the same function, a different backward

    Both modes normalize with the running statistics, so they compute the same function of the
    parameters. Eval mode runs conv then BN; tune mode folds BN into the conv on the fly,
    `w' = w * scale / sqrt(var + eps)`, `b' = bias - mean * scale / sqrt(var + eps)`, *inside*
    autodiff, so the gradients with respect to the conv kernel and the BN scale and bias are still
    those of eval mode.

    We compile `jax.grad` of the loss once per mode: `with convbn_mode(mode):` switches every
    ConvBN of the model while the function is traced. The compiled functions give the logits
    and gradients, and below, XLA's memory analysis of the very same executables.
    """),
    code("""
    def loss_and_logits(params, images, labels):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images)
        return cross_entropy(logits, labels), logits


    grad_fn = jax.jit(jax.grad(loss_and_logits, has_aux=True))
    compiled = {}
    for mode in ("eval", "tune"):
        with convbn_mode(mode):
            compiled[mode] = grad_fn.lower(params, images, labels).compile()

    grads_eval, logits_eval = compiled["eval"](params, images, labels)
    grads_tune, logits_tune = compiled["tune"](params, images, labels)


    def max_rel_err(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


    grad_errs = jax.tree.map(max_rel_err, grads_tune, grads_eval)
    worst = max(jax.tree.leaves(grad_errs))
    n_arrays = len(jax.tree.leaves(grads_eval))
    logits_err = max_rel_err(logits_tune, logits_eval)
    print(f"logits:    max |tune - eval| / max |eval| = {logits_err:.1e}")
    print(f"gradients: the same, worst of {n_arrays} arrays = {worst:.1e}")
    np.testing.assert_allclose(logits_tune, logits_eval, rtol=1e-4, atol=1e-4)
    assert worst < 1e-4, grad_errs
    """),
    md("""
    ## Memory: what the backward pass keeps

    In eval mode the backward of each BN needs the conv output it normalized, so autodiff keeps
    both the conv input and the conv output of every layer. In tune mode the BN is part of the
    (kernel-sized) folded weight, so only the conv input is kept (and for ConvBN+ReLU the ReLU
    mask is taken from the output, which the next layer keeps anyway). XLA reports the scratch
    memory of a compiled executable; we compare the two compiled gradient functions from above.
    """),
    code("""
    temp = {mode: c.memory_analysis().temp_size_in_bytes for mode, c in compiled.items()}
    for mode, nbytes in temp.items():
        print(f"{mode:>4}: jit(grad) temp memory {nbytes / 2**20:6.2f} MiB")
    ratio = temp["tune"] / temp["eval"]
    print(f"tune / eval = {ratio:.2f}")
    assert temp["tune"] < temp["eval"]
    """),
    md("""
    ## Deploy: fold once, then it is a plain conv

    For inference, `fold_for_deploy` folds every ConvBN's statistics into its kernel and bias once;
    the result has no `batch_stats` at all, and the model applied in `deploy` mode gives the eval
    outputs.
    """),
    code("""
    deploy_variables = fold_for_deploy({"params": params, "batch_stats": batch_stats})
    print("deploy collections:", sorted(deploy_variables))
    stem = deploy_variables["params"]["conv1"]
    print("stem ConvBN params after folding:", jax.tree.map(jnp.shape, stem))

    with convbn_mode("deploy"):
        logits_deploy = jax.jit(model.apply)(deploy_variables, images)

    err = max_rel_err(logits_deploy, logits_eval)
    print(f"logits: max |deploy - eval| / max |eval| = {err:.1e}")
    assert sorted(deploy_variables) == ["params"]
    assert sorted(stem) == ["bias", "kernel"]
    np.testing.assert_allclose(logits_deploy, logits_eval, rtol=1e-4, atol=1e-4)
    """),
    md("""
    ## Summary

    * `train` mode learns and updates the running statistics; `eval`, `tune` and `deploy` use them.
    * `tune` gives eval's outputs and gradients with a smaller backward: use it to fine-tune or
      transfer a pretrained ConvBN network (`with convbn_mode("tune"):` around the loss).
    * `deploy` after `fold_for_deploy` gives eval's outputs with a plain conv per layer.

    The same switch works for any Linen model built from `ConvBN` / `LinearBN`, including your
    own. BENCHMARKS.md ("convbn_modes") has the memory and speed figures at larger sizes.
    """),
]


# ----------------------------------------------------------------------------------------------
# 02: Gated linear attention.

GLA: list[Cell] = [
    md("""
    # Gated linear attention: the op, the layer and a tiny language model

    *Gated Linear Attention Transformers with Hardware-Efficient Training*, Yang et al., ICML 2024
    ([arXiv 2312.06635](https://arxiv.org/abs/2312.06635)).

    Each head keeps a `K x V` state updated with a data-dependent, per-key-channel forget gate:

    $$S_t = \\operatorname{diag}(\\alpha_t)\\, S_{t-1} + k_t^\\top v_t, \\qquad
    o_t = \\text{scale}\\cdot q_t S_t, \\qquad g_t = \\log \\alpha_t \\le 0 .$$

    `jaxblocks.kernels.gla` has two public functions with fla's argument layout
    (`[batch, time, heads, dim]`):

    * `chunk_gla`: the chunkwise-parallel form for training and prompt processing;
    * `fused_recurrent_gla`: the token loop, for decoding a few tokens against a state.

    Each takes `implementation=`: `"reference"` (the token loop in fp32: the specification),
    `"xla"` (the chunked pure-JAX form, the default on CPU), `"pallas_gpu"` and `"pallas_tpu"`
    (kernels; notebook 03 shows how to check them on CPU). `None` picks the fastest available.
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxblocks
    import jaxblocks.kernels.gla as gla
    from jaxblocks.layers import GatedLinearAttention


    def rel_rms(a, b):
        # fla's metric: rms(a - b) / rms(b)
        return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b**2)))
    """),
    md("""
    ## Reference vs the chunked XLA implementation

    Random inputs, with a length (50) that is not a multiple of the chunk size (16). The gates
    are log-sigmoids, so each step forgets a little of the state. Outputs, final states and the
    gradients of every input agree to float32 rounding.
    """),
    code("""
    B, T, H, K, V = 2, 50, 2, 16, 24
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, H, K))
    k = jax.random.normal(kk, (B, T, H, K))
    v = jax.random.normal(kv, (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, K)) + 2.0)  # log forget gates < 0


    def run(implementation):
        def loss(q, k, v, g):
            o, state = gla.chunk_gla(
                q, k, v, g, output_final_state=True, chunk_size=16,
                implementation=implementation,
            )
            return jnp.sum(jnp.sin(o)), (o, state)  # a non-trivial cotangent

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, g)


    grads_ref, (o_ref, state_ref) = run("reference")
    grads_xla, (o_xla, state_xla) = run("xla")
    errors = {"o": rel_rms(o_xla, o_ref), "final state": rel_rms(state_xla, state_ref)}
    errors.update({f"d{n}": rel_rms(a, b) for n, a, b in zip("qkvg", grads_xla, grads_ref)})
    for name, err in errors.items():
        print(f"xla vs reference, {name:>11}: rel-RMS {err:.1e}")
    assert max(errors.values()) < 1e-5, errors
    """),
    md("""
    ## Decoding: a prompt chunkwise, then one token at a time

    Linear attention is an RNN: process a prompt with `chunk_gla` and keep its final state, then
    continue token by token with `fused_recurrent_gla` from that state (constant work per token).
    The outputs equal one `chunk_gla` call over the whole sequence.
    """),
    code("""
    P = 37  # prompt length
    o_prompt, state = gla.chunk_gla(
        q[:, :P], k[:, :P], v[:, :P], g[:, :P], output_final_state=True, chunk_size=16
    )
    step = jax.jit(
        lambda q, k, v, g, s: gla.fused_recurrent_gla(
            q, k, v, g, initial_state=s, output_final_state=True
        )
    )
    outputs = [o_prompt]
    for t in range(P, T):
        o_t, state = step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], state)
        outputs.append(o_t)
    o_decoded = jnp.concatenate(outputs, axis=1)

    print(f"decoded vs one pass: outputs {rel_rms(o_decoded, o_ref):.1e}, "
          f"final state {rel_rms(state, state_ref):.1e}")
    assert o_decoded.shape == (B, T, H, V)
    assert rel_rms(o_decoded, o_ref) < 1e-5 and rel_rms(state, state_ref) < 1e-5
    """),
    md("""
    ## The layer: `jaxblocks.layers.GatedLinearAttention`

    The paper's (and fla's) layer: q, k, v projections (keys `expand_k * d` wide, values
    `expand_v * d`), an optional short causal convolution, a low-rank gate
    `log alpha = logsigmoid(W2 W1 x) / 16`, a per-head RMSNorm and a swish output gate.
    It maps `[batch, time, d]` to `[batch, time, d]` and is causal: changing the inputs from
    position 15 on leaves the outputs before position 15 unchanged.
    """),
    code("""
    layer = GatedLinearAttention(num_heads=2, use_short_conv=True, chunk_size=16)
    x = jax.random.normal(jax.random.key(1), (2, 24, 64))
    params = jax.jit(layer.init)(jax.random.key(2), x)["params"]
    apply = jax.jit(layer.apply)
    y = apply({"params": params}, x)
    print(f"sub-layers: {sorted(params)}")
    print(f"{sum(p.size for p in jax.tree.leaves(params)):,} parameters")
    print("x", x.shape, "-> y", y.shape)

    x_changed = x.at[:, 15:].add(jax.random.normal(jax.random.key(3), (2, 9, 64)))
    y_changed = apply({"params": params}, x_changed)
    past = float(jnp.max(jnp.abs(y_changed[:, :15] - y[:, :15])))
    future = float(jnp.max(jnp.abs(y_changed[:, 15:] - y[:, 15:])))
    print(f"max change of outputs before t=15: {past:.1e}, from t=15 on: {future:.2f}")
    assert y.shape == x.shape
    assert past < 1e-6 and future > 1e-2
    """),
    md("""
    ## A tiny GLA language model from the registry

    The registry has GLA Transformer LMs from `gla_lm_tiny` (CPU tests) to fla's 340M
    configuration. We train `gla_lm_tiny` for 60 steps on sequences that count modulo 10
    (`3 4 5 6 7 8 9 0 1 ...`, random start), which it learns quickly.
    """),
    code("""
    print([name for name in jaxblocks.list_models() if name.startswith("gla")])

    model = jaxblocks.create_model("gla_lm_tiny")


    def counting_batch(key, batch=16, length=24, modulus=10):
        start = jax.random.randint(key, (batch, 1), 0, modulus)
        return (start + jnp.arange(length)[None, :]) % modulus


    params = jax.jit(model.init)(jax.random.key(0), counting_batch(jax.random.key(1)))["params"]
    print(f"{sum(p.size for p in jax.tree.leaves(params)):,} parameters")
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)


    @jax.jit
    def train_step(params, opt_state, tokens):
        def loss_fn(params):
            logits = model.apply({"params": params}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss


    losses = []
    for i, key in enumerate(jax.random.split(jax.random.key(2), 60)):
        params, opt_state, loss = train_step(params, opt_state, counting_batch(key))
        losses.append(float(loss))
        if i % 20 == 0 or i == 59:
            print(f"step {i:2d}: loss {losses[-1]:.3f}")
    assert losses[-1] < 0.2 * losses[0]
    """),
    md("""
    ## Generating: recurrent decoding with a cache

    The same model built with `decode=True` keeps each layer's recurrent state (and short-conv
    inputs) in the `cache` collection, which starts at zero: the prompt is consumed chunkwise,
    then each new token costs one recurrent step. Greedy decoding continues the count,
    and the logits of each decoding step equal those of the ordinary model run on the whole
    sequence.
    """),
    code("""
    decoder = jaxblocks.create_model("gla_lm_tiny", decode=True)
    prompt = jnp.array([[3, 4, 5, 6, 7]], jnp.int32)
    # The cache starts at zero; its shapes come from the decoder's init without running it.
    cache_shapes = jax.eval_shape(decoder.init, jax.random.key(0), prompt[:, :1])["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
    decode = jax.jit(
        lambda cache, tokens: decoder.apply(
            {"params": params, "cache": cache}, tokens, mutable=["cache"]
        )
    )

    logits, updated = decode(cache, prompt)  # the prompt, chunkwise
    step_logits = [logits[:, -1]]
    for _ in range(9):  # then one token per step
        next_token = jnp.argmax(step_logits[-1], axis=-1)[:, None].astype(jnp.int32)
        logits, updated = decode(updated["cache"], next_token)
        step_logits.append(logits[:, -1])
    step_logits = jnp.stack(step_logits, axis=1)  # [1, 10, vocab]
    generated = jnp.argmax(step_logits, axis=-1)
    print("prompt:   ", prompt[0].tolist())
    print("generated:", generated[0].tolist())

    full = jnp.concatenate([prompt, generated[:, :-1]], axis=1)
    full_logits = jax.jit(model.apply)({"params": params}, full)[:, prompt.shape[1] - 1 :]
    print(f"decoding vs full forward, logits rel-RMS: {rel_rms(step_logits, full_logits):.1e}")
    assert generated[0].tolist() == [8, 9, 0, 1, 2, 3, 4, 5, 6, 7]
    assert rel_rms(step_logits, full_logits) < 1e-4
    """),
]


# ----------------------------------------------------------------------------------------------
# 03: Verifying Pallas kernels without a GPU.

KERNELS: list[Cell] = [
    md("""
    # Checking a kernel without a GPU: interpret mode and lowering

    The hot ops in `jaxblocks.kernels` have Pallas kernels for GPU (Triton backend) and TPU
    (Mosaic), next to a pure-JAX `"xla"` implementation and an fp32 `"reference"`. Two checks run
    on any CPU machine (and in CI):

    1. **Numerics, in interpret mode.** Inside `with jaxblocks.kernels.interpret():` the Pallas
       kernels traced in the block run through the Pallas interpreters on CPU (the GPU one, and
       the TPU one, which simulates the sequential grid and on-chip memory). Compare the forward
       and *every* gradient (the kernels have hand-written backward kernels) with the reference.
    2. **Lowering, for `cuda` and `tpu`.** `jaxblocks.kernels.lowering.check_lowering` exports a
       function with `jax.export` for a platform this machine does not have and checks that the
       Pallas kernels are in the module (Triton or Mosaic custom calls). This runs the
       Pallas-to-Triton and Pallas-to-Mosaic lowering at realistic shapes without allocating
       anything, which catches block-shape and unsupported-operation errors; the final compile to
       machine code still happens on the device.

    The ops: `pointwise_conv_bn` (a 1x1 convolution with the BatchNorm fold and an activation fused,
    notebook 01's Tune mode) and `chunk_gla` (notebook 02). The interpreters are slow, so the
    numerical check uses tiny shapes (the tests in `tests/kernels/` run every op this way); the
    lowering uses real ones.
    """),
    code("""
    import re

    import jax
    import jax.numpy as jnp

    import jaxblocks.kernels
    import jaxblocks.kernels.gla as gla
    import jaxblocks.kernels.lowering as lowering
    from jaxblocks.kernels.conv_bn import pointwise_conv_bn


    def rel_rms(a, b):
        return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b**2)))
    """),
    md("""
    ## 1. Interpret mode: `pointwise_conv_bn`

    Small random inputs with an odd number of rows (37) and channel counts that are not powers of
    two (24 -> 40), so the kernels' padding is exercised. We differentiate a loss with a
    non-trivial cotangent with respect to the input, the weight and the BN scale and bias.
    Each implementation is traced (by `jax.jit`) inside the `interpret()` block.
    """),
    code("""
    keys = jax.random.split(jax.random.key(0), 6)
    M, C_in, C_out = 37, 24, 40
    x = jax.random.normal(keys[0], (M, C_in))
    w = jax.random.normal(keys[1], (C_in, C_out)) / C_in**0.5
    scale = 1.0 + 0.2 * jax.random.normal(keys[2], (C_out,))
    bias = 0.1 * jax.random.normal(keys[3], (C_out,))
    mean = 0.3 * jax.random.normal(keys[4], (C_out,))  # running statistics
    var = jnp.exp(0.5 * jax.random.normal(keys[5], (C_out,)))


    def conv_bn_value_and_grad(implementation):
        def loss(x, w, scale, bias):
            y = pointwise_conv_bn(
                x, w, scale, bias, mean, var, activation="silu", implementation=implementation
            )
            return jnp.sum(y * jnp.cos(y)), y

        grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        return jax.jit(grad)(x, w, scale, bias)


    grads_ref, y_ref = conv_bn_value_and_grad("reference")
    with jaxblocks.kernels.interpret():
        for implementation in ("pallas_gpu", "pallas_tpu"):
            grads, y = conv_bn_value_and_grad(implementation)
            errors = {"y": rel_rms(y, y_ref)}
            names = ("dx", "dw", "dscale", "dbias")
            errors.update({n: rel_rms(a, b) for n, a, b in zip(names, grads, grads_ref)})
            print(f"{implementation}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
            assert max(errors.values()) < 1e-5, (implementation, errors)
    """),
    md("""
    Outside the block the same Pallas implementation cannot run on a CPU: interpret mode is a
    switch that tests turn on, never a default (`implementation=None` picks `"xla"` on CPU).
    """),
    code("""
    assert not jaxblocks.kernels.interpret_enabled()
    if jax.default_backend() == "cpu":  # on a GPU machine the kernel would simply run
        try:
            conv_bn_value_and_grad("pallas_gpu")
        except Exception as e:  # what Pallas says when asked to compile a GPU kernel for CPU
            print(f"outside interpret(): {type(e).__name__}: {str(e).splitlines()[0]}")
        else:
            raise AssertionError("a Pallas GPU kernel ran on CPU outside interpret mode")
    """),
    md("""
    ## 2. Lowering for `cuda` and `tpu`

    We lower `jax.value_and_grad` of each op, so that the backward kernels are lowered too, at
    realistic shapes given as `jax.ShapeDtypeStruct`s (nothing is allocated): a ResNet-50 1x1
    convolution in bfloat16 and a GLA layer over 2048 tokens. `check_lowering` raises a
    `LoweringError` naming the op, platform and shapes if the export fails or holds fewer Pallas
    kernels than asked for; it returns the StableHLO text, in which we look up the kernel names.
    """),
    code("""
    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype)


    conv_bn_args = (
        spec((8 * 56 * 56, 256), jnp.bfloat16), spec((256, 64), jnp.bfloat16),
        spec((64,)), spec((64,)), spec((64,)), spec((64,)),
    )
    gla_args = (
        spec((2, 2048, 8, 128), jnp.bfloat16), spec((2, 2048, 8, 128), jnp.bfloat16),
        spec((2, 2048, 8, 128), jnp.bfloat16), spec((2, 2048, 8, 128)),
    )

    for implementation, platform in (("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")):

        def conv_bn_loss(x, w, scale, bias, mean, var):
            y = pointwise_conv_bn(
                x, w, scale, bias, mean, var, activation="relu", implementation=implementation
            )
            return jnp.sum(y.astype(jnp.float32))

        def gla_loss(q, k, v, g):
            o, _ = gla.chunk_gla(q, k, v, g, implementation=implementation)
            return jnp.sum(o.astype(jnp.float32))

        for name, loss, args, min_kernels in (
            ("pointwise_conv_bn", conv_bn_loss, conv_bn_args, 3),  # forward, dx, dw
            ("chunk_gla", gla_loss, gla_args, 2),  # at least one forward and one backward
        ):
            value_and_grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
            text = lowering.check_lowering(
                value_and_grad, args, platform, op=f"{name}[{implementation}]",
                min_kernels=min_kernels,
            )
            custom_call = lowering.PALLAS_CUSTOM_CALL[platform]
            n = text.count(custom_call)
            print(f"{platform:>4} {name:<17}: {n} Pallas kernels ({custom_call})")
            if name == "pointwise_conv_bn":
                kernels = set(re.findall(r"pointwise_conv_bn_(?:fwd|bwd_dx|bwd_dw)", text))
                print(f"{'':>23}{sorted(kernels)}")
                assert kernels == {f"pointwise_conv_bn_{k}" for k in ("fwd", "bwd_dx", "bwd_dw")}
    """),
    md("""
    ## What a failure looks like

    `check_lowering` requires the Pallas kernels to be present, so lowering the `"xla"`
    implementation (plain XLA, no kernel) is reported as an error that names the op, the
    platform and the argument shapes.
    """),
    code("""
    def xla_loss(q, k, v, g):
        o, _ = gla.chunk_gla(q, k, v, g, implementation="xla")
        return jnp.sum(o.astype(jnp.float32))


    try:
        lowering.check_lowering(xla_loss, gla_args, "tpu", op="chunk_gla[xla]")
    except lowering.LoweringError as e:
        print("LoweringError:", str(e)[:160], "...")
    else:
        raise AssertionError("the xla implementation has no Pallas kernel; expected an error")
    """),
]


# ----------------------------------------------------------------------------------------------
# 04: The normalization family.

NORMS: list[Cell] = [
    md("""
    # Normalization layers beyond BatchNorm

    `jaxblocks.layers` has the normalization layers of several papers, all following
    `flax.linen.BatchNorm`'s conventions (channels last, statistics in float32, running
    statistics in `batch_stats` with `momentum` as the decay, biased variance,
    `use_running_average` on the constructor or the call):

    * `GhostBatchNorm`: BN statistics per small "ghost" batch inside a large batch
      (Hoffer et al. 2017, [arXiv 1705.08741](https://arxiv.org/abs/1705.08741)).
    * `PowerNorm`: BN for transformers: quadratic mean, no centring, padding masked out
      (Shen et al. 2020, [arXiv 2003.07845](https://arxiv.org/abs/2003.07845)).
    * `EvoNormB0`, `EvoNormS0`: searched normalization-activation layers replacing BN+ReLU
      (Liu et al. 2020, [arXiv 2004.02967](https://arxiv.org/abs/2004.02967)).
    * `WSConv` + `BatchChannelNorm`: weight standardization and batch-channel normalization
      for micro-batches (Qiao et al. 2019, [arXiv 1903.10520](https://arxiv.org/abs/1903.10520),
      [arXiv 1911.09738](https://arxiv.org/abs/1911.09738)).
    * `RepBN`, `PRepBN`: BN plus a scaled identity for transformers, foldable into the next
      linear layer (Guo et al. 2024, SLAB, [arXiv 2405.11582](https://arxiv.org/abs/2405.11582)).

    Each section below shows, on random inputs, a property that defines the layer and asserts it.
    """),
    code("""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxblocks.layers import (
        BatchChannelNorm,
        EvoNormB0,
        EvoNormS0,
        GhostBatchNorm,
        PowerNorm,
        PRepBN,
        RepBN,
        WSConv,
        fold_repbn_into_dense,
        prepbn_lambda,
        repbn_affine,
    )


    def max_abs(a):
        return float(jnp.max(jnp.abs(a)))


    x = 2.0 * jax.random.normal(jax.random.key(0), (8, 6, 6, 16)) + 0.5  # NHWC images
    tokens = 3.0 * jax.random.normal(jax.random.key(1), (4, 10, 16)) + 1.0  # [B, T, C]
    """),
    md("""
    ## Ghost BatchNorm

    With a ghost batch as large as the batch, it *is* BatchNorm: same outputs and same running
    statistics as `flax.linen.BatchNorm`. With ghost batches of 4 in a batch of 8, each group of 4
    samples is normalized by its own statistics (each has mean 0 per channel), so the output
    differs from BatchNorm's; the running statistics take one EMA step per ghost batch, in order.
    """),
    code("""
    gbn = GhostBatchNorm(ghost_batch_size=8, momentum=0.9)
    bn = nn.BatchNorm(momentum=0.9)
    variables = gbn.init(jax.random.key(2), x, use_running_average=False)
    train = dict(use_running_average=False, mutable=["batch_stats"])
    y_ghost, stats_ghost = gbn.apply(variables, x, **train)
    y_bn, stats_bn = bn.apply(variables, x, **train)
    stat_diffs = jax.tree.map(lambda a, b: max_abs(a - b), stats_ghost, stats_bn)
    stat_diff = max(jax.tree.leaves(stat_diffs))
    print(f"ghost size 8 vs BatchNorm: outputs {max_abs(y_ghost - y_bn):.1e}, "
          f"running stats {stat_diff:.1e}")
    assert max_abs(y_ghost - y_bn) < 1e-5 and stat_diff < 1e-6

    y_ghost4, _ = GhostBatchNorm(ghost_batch_size=4).apply(variables, x, **train)
    ghost_means = y_ghost4.reshape(2, 4, 6, 6, 16).mean(axis=(1, 2, 3))  # [ghost batch, C]
    print(f"ghost size 4: per-ghost-batch channel means {max_abs(ghost_means):.1e}, "
          f"differs from BatchNorm by up to {max_abs(y_ghost4 - y_bn):.2f}")
    assert max_abs(ghost_means) < 1e-5 and max_abs(y_ghost4 - y_bn) > 1e-2
    """),
    md("""
    ## PowerNorm

    For token sequences `[B, T, C]` with padding. PowerNorm does not subtract the mean: it divides
    by the quadratic mean `sqrt(mean(x^2))` over the real tokens (the `mask` excludes padding), the
    batch one during a warm-up and a running one (`psi2`) afterwards, with an approximate backward
    through the running statistic. During warm-up, the output's per-channel mean square over real
    tokens is 1 while its mean is not 0 (BatchNorm would centre it); the state counts steps and
    tracks `psi2`. Changing the padded positions changes no real output.
    """),
    code("""
    lengths = jnp.array([10, 7, 5, 3])
    mask = jnp.arange(10)[None, :] < lengths[:, None]  # True = real token
    pn = PowerNorm(warmup_steps=10, group_num=None)
    variables = pn.init(jax.random.key(3), tokens, use_running_average=False)
    train = dict(use_running_average=False, mask=mask, mutable=["batch_stats"])
    y, updates = pn.apply(variables, tokens, **train)

    real = mask[..., None]
    n_real = jnp.sum(mask)
    mean_square = jnp.sum(jnp.where(real, y**2, 0.0), axis=(0, 1)) / n_real
    mean = jnp.sum(jnp.where(real, y, 0.0), axis=(0, 1)) / n_real
    print(f"per-channel mean square: {mean_square.min():.5f} .. {mean_square.max():.5f}")
    print(f"per-channel mean:        {mean.min():.3f} .. {mean.max():.3f}, "
          f"average {mean.mean():.3f} (not centred)")
    print("state after one step:", {k: v.shape for k, v in updates["batch_stats"].items()},
          "step =", int(updates["batch_stats"]["step"]))
    np.testing.assert_allclose(mean_square, 1.0, rtol=1e-4)
    assert float(mean.mean()) > 0.1  # inputs have mean 1 and RMS sqrt(10): about 0.32
    assert int(updates["batch_stats"]["step"]) == 1

    tokens_repadded = jnp.where(real, tokens, 100.0)
    y2, _ = pn.apply(variables, tokens_repadded, **train)
    change = max_abs(jnp.where(real, y2 - y, 0.0))
    print(f"change of real outputs when the padding changes: {change:.1e}")
    assert change < 1e-5
    """),
    md("""
    ## EvoNorm-B0 and EvoNorm-S0

    Both replace BN+ReLU. **S0** normalizes each sample by its own group statistics
    (`x * sigmoid(v x) / group_std`), so it is batch-independent: a sample's output is the same
    alone or in a batch. **B0** divides by the larger of the batch standard deviation and a learned
    instance term, so in training its output depends on the rest of the batch (at evaluation it
    uses the running variance).
    """),
    code("""
    s0 = EvoNormS0(groups=4)
    v_s0 = s0.init(jax.random.key(4), x)
    s0_diff = max_abs(s0.apply(v_s0, x)[:1] - s0.apply(v_s0, x[:1]))
    print(f"EvoNorm-S0: sample 0 in a batch of 8 vs alone: {s0_diff:.1e}")

    b0 = EvoNormB0()
    v_b0 = b0.init(jax.random.key(4), x, use_running_average=False)
    y_8, _ = b0.apply(v_b0, x, use_running_average=False, mutable=["batch_stats"])
    y_4, _ = b0.apply(v_b0, x[:4], use_running_average=False, mutable=["batch_stats"])
    b0_diff = max_abs(y_8[:4] - y_4)
    print(f"EvoNorm-B0: samples 0-3 in a batch of 8 vs of 4: {b0_diff:.2f}")
    assert s0_diff < 1e-5 and b0_diff > 1e-2
    """),
    md("""
    ## Weight standardization + Batch-Channel Normalization

    For micro-batches (1-2 images per device). `WSConv` standardizes each output channel's kernel
    on every call; `BatchChannelNorm` normalizes with running estimates (updated from the batch
    first, the paper's `EstBN`, so a batch of one works), then per sample over channel groups.
    With its initial affine (1, 0) each group of each sample has mean 0 and variance 1.
    """),
    code("""
    class WSBlock(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = WSConv(16, (3, 3), use_bias=False)(x)
            return BatchChannelNorm(num_groups=4)(x, use_running_average=not train)


    block = WSBlock()
    one_image = x[:1]
    variables = block.init(jax.random.key(5), one_image, train=False)
    y, updates = block.apply(variables, one_image, train=True, mutable=["batch_stats"])
    groups = y.reshape(1, 6, 6, 4, 4)  # [B, H, W, group, channels per group]
    group_mean = groups.mean(axis=(1, 2, 4))
    group_var = groups.var(axis=(1, 2, 4))
    print(f"batch of 1: group means up to {max_abs(group_mean):.1e}, "
          f"group variances {float(group_var.min()):.4f} .. {float(group_var.max()):.4f}")
    print("running estimates moved:",
          max_abs(updates["batch_stats"]["BatchChannelNorm_0"]["mean"]) > 0)
    assert max_abs(group_mean) < 1e-5
    np.testing.assert_allclose(group_var, 1.0, rtol=1e-3)
    assert max_abs(updates["batch_stats"]["BatchChannelNorm_0"]["mean"]) > 0
    """),
    md("""
    ## RepBN and PRepBN (SLAB)

    `RepBN(x) = BN(x) + alpha * x` over tokens. At inference it is a per-channel affine `a x + b`
    (`repbn_affine`), which folds exactly into the following Dense layer
    (`fold_repbn_into_dense`): a transformer with RepBN pays nothing for its norms at inference.
    `PRepBN` trains with `lambda * LayerNorm(x) + (1 - lambda) * RepBN(x)`, `lambda` decaying
    linearly from 1 to 0 (`prepbn_lambda`): at step 0 it is exactly LayerNorm.
    """),
    code("""
    repbn = RepBN()
    variables = repbn.init(jax.random.key(6), tokens, use_running_average=False)
    for _ in range(3):  # a few training calls update the running statistics
        _, updates = repbn.apply(
            variables, tokens, use_running_average=False, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
    y_inference = repbn.apply(variables, tokens, use_running_average=True)
    a, b = repbn_affine(variables)
    affine_diff = max_abs(y_inference - (tokens * a[None, None, :] + b[None, None, :]))

    dense = nn.Dense(32)
    dense_params = dense.init(jax.random.key(7), tokens)["params"]
    folded = fold_repbn_into_dense(variables, dense_params)
    fold_diff = max_abs(
        dense.apply({"params": dense_params}, y_inference) - dense.apply({"params": folded}, tokens)
    )
    print(f"RepBN at inference vs a*x + b: {affine_diff:.1e}")
    print(f"Dense(RepBN(x)) vs folded Dense'(x): {fold_diff:.1e}")
    assert affine_diff < 1e-5 and fold_diff < 1e-4

    prepbn = PRepBN(total_steps=4)
    v_prepbn = prepbn.init(jax.random.key(8), tokens, use_running_average=False)
    y_step0, _ = prepbn.apply(v_prepbn, tokens, use_running_average=False, mutable=["batch_stats"])
    y_ln = nn.LayerNorm(epsilon=1e-5).apply({"params": v_prepbn["params"]["ln"]}, tokens)
    schedule = [float(prepbn_lambda(step, total_steps=4)) for step in range(6)]
    print(f"PRepBN at step 0 vs LayerNorm: {max_abs(y_step0 - y_ln):.1e}")
    print(f"lambda by step: {schedule}")
    assert max_abs(y_step0 - y_ln) < 1e-6
    assert schedule == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """),
]


# ----------------------------------------------------------------------------------------------
# 05: jaxblocks from Flax NNX.

NNX: list[Cell] = [
    md("""
    # jaxblocks from Flax NNX

    jaxblocks' layers and registered models are Flax Linen modules. `flax.nnx.bridge.ToNNX`
    wraps any of them as an NNX module: its variables become NNX state, calls need no
    `apply`, and `nnx.Optimizer` trains it. This notebook wraps a layer and a registry ResNet
    with BatchNorm statistics, checks that the NNX calls give the Linen outputs on the same
    variables, and trains the ResNet for a few steps on scikit-learn's digits.

    Our parameters carry logical axis names (for sharding on a mesh); NNX shards such variables
    eagerly, which needs a mesh. Without one, create them under
    `nnx.use_eager_sharding(False)`, as below.
    """),
    code("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from flax.nnx import bridge

    import jaxblocks
    from jaxblocks.data import load_digits
    from jaxblocks.layers import GatedLinearAttention
    """),
    md("""
    ## A layer: gated linear attention

    `lazy_init` runs the Linen `init` on an example input; afterwards the module is called like
    any NNX module. The same numbers come out of the Linen `apply` with the variables NNX holds.
    """),
    code("""
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    layer = GatedLinearAttention(num_heads=2)
    with nnx.use_eager_sharding(False):
        gla = bridge.ToNNX(layer, rngs=nnx.Rngs(0)).lazy_init(x)
        y_nnx = gla(x)
    params = nnx.to_pure_dict(nnx.state(gla, nnx.Param))
    y_linen = layer.apply({"params": params}, x)
    print(y_nnx.shape, float(jnp.max(jnp.abs(y_nnx - y_linen))))
    assert jnp.allclose(y_nnx, y_linen, atol=1e-6)
    """),
    md("""
    ## A registry ResNet with running statistics

    `train=True` uses batch statistics and updates the running ones: pass
    `mutable=["batch_stats"]` to the NNX call, as to a Linen `apply`; `train=False` uses the
    running statistics.
    """),
    code("""
    x_train, y_train = load_digits("train", classes=tuple(range(10)), size=16, channels=1)
    x_test, y_test = load_digits("test", classes=tuple(range(10)), size=16, channels=1)
    resnet = jaxblocks.create_model(
        "resnet18", num_classes=10, width=8, stem="small", stage_sizes=(1, 1, 1, 1)
    )
    with nnx.use_eager_sharding(False):
        model = bridge.ToNNX(resnet, rngs=nnx.Rngs(0)).lazy_init(x_train[:8], train=False)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)


    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss


    @nnx.jit
    def accuracy(model, x, y):
        return jnp.mean(jnp.argmax(model(x, train=False), -1) == y)


    rng = np.random.default_rng(0)
    losses = []
    with nnx.use_eager_sharding(False):
        acc0 = float(accuracy(model, x_test, y_test))
        for step in range(60):
            idx = rng.choice(len(x_train), 64, replace=False)
            losses.append(float(train_step(model, optimizer, x_train[idx], y_train[idx])))
        acc = float(accuracy(model, x_test, y_test))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; test accuracy {acc0:.3f} -> {acc:.3f}")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]) and acc > acc0 + 0.3
    """),
    md("""
    The trained NNX module still holds plain Linen variables: the same `resnet` evaluates them
    with `apply`, so checkpoints and tools written for either API agree.
    """),
    code("""
    variables = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }
    with nnx.use_eager_sharding(False):
        out_nnx = model(x_test[:32], train=False)
    out_linen = resnet.apply(variables, x_test[:32], train=False)
    print(float(jnp.max(jnp.abs(out_nnx - out_linen))))
    assert jnp.allclose(out_nnx, out_linen, atol=1e-5)
    """),
]


NOTEBOOKS: dict[str, list[Cell]] = {
    "01_convbn_tune_mode.ipynb": CONVBN,
    "02_gated_linear_attention.ipynb": GLA,
    "03_kernels_interpret_and_lowering.ipynb": KERNELS,
    "04_normalization_family.ipynb": NORMS,
    "05_nnx_bridge.ipynb": NNX,
}


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def notebook(name: str, cells: list[Cell]) -> dict:
    """An nbformat 4.5 notebook with empty outputs."""
    prefix = name.split("_", 1)[0]
    cells = [cells[0], code(INSTALL), *cells[1:]]  # the title, then the install cell
    out = []
    for i, (kind, text) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"nb{prefix}-{i:02d}", "metadata": {}}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cell["source"] = _lines(text)
        out.append(cell)
    return {
        "cells": out,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render(name: str) -> str:
    """The file contents of notebook ``name``."""
    return json.dumps(notebook(name, NOTEBOOKS[name]), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differing files")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = NOTEBOOK_DIR / name
        text = render(name)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "differ" if args.check else "written"
    print(f"{len(stale)} notebook(s) {verb}: {', '.join(stale) or '-'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
