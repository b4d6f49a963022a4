"""Vision backbones side by side: images/s of the small presets, InceptionNeXt vs ConvNeXt, SLA vs
softmax attention by token count, and (with the ``torch`` extra) jaxblocks against timm.

Issues "Vision backbones I/II". Four tables, each measured in one run on one machine:

1. Inference and one training step (forward, backward, SGD update; BatchNorm in train mode) of
   the smallest registered preset of each vision family at 224² (batch 8; ``--quick``: 64²,
   batch 2), images/s relative to ResNet-50 measured in the same run.
2. InceptionNeXt-T against ConvNeXt-T built from the same `MetaNeXtBlock`s with `ConvNeXtMixer`
   (7×7 depthwise) (the paper's ablation: only the token mixer differs), training images/s (paper:
   1.6× on an A100; on CPU the depthwise convolutions are not memory-bound the same way).
3. SLAB's simplified linear attention against softmax multi-head attention at DeiT-T width
   (192 channels, 3 heads), forward time by token count: where the linear form overtakes.
4. With torch and timm installed: ``inception_next_atto``, ``resnet50`` and ``nextvit_small``
   inference, jaxblocks (XLA:CPU, jit) / timm (eager PyTorch, ``torch.inference_mode``), same
   input, same threads.

Times are medians of interleaved repetitions; only ratios are reported on CPU.
"""

from __future__ import annotations

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.common import interleaved_medians
from jaxblocks.blocks.inception_next import ConvNeXtMixer
from jaxblocks.layers.attention import SimplifiedLinearAttention
from jaxblocks.registry import create_model, example_input, list_models

# The smallest ImageNet-size preset of each family (those registered are measured).
SMALL_PRESETS = (
    "resnet50",
    "resnet18",
    "mobilenet_v2",
    "inception_next_atto",
    "unireplknet_a",
    "nextvit_small",
    "ffnet_1",
    "tiny_moat_0",
    "uniformer_xxs",
    "emov2_1m",
    "raftmlp_s",
    "msvmamba_nano",
    "slab_deit_tiny",
)
BASELINE = "resnet50"
TOKENS = (196, 784, 3136, 12544)
QUICK_TOKENS = (64, 256)


def _accepts_train(model: nn.Module) -> bool:
    return "train" in inspect.signature(type(model).__call__).parameters


def _image(name: str, batch: int, size: int) -> jax.Array:
    x = example_input(name)
    if x.ndim != 4:
        raise ValueError(f"vision benchmark: {name} takes {x.shape}, not an NHWC image")
    return jax.random.normal(jax.random.key(0), (batch, size, size, x.shape[-1]), jnp.float32)


def _step_fns(model: nn.Module, x: jax.Array):
    """(inference thunk, training-step thunk) of ``model`` on ``x``, compiled once each."""
    variables = jax.jit(model.init)(jax.random.key(1), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    eval_kw = {"train": False} if _accepts_train(model) else {}
    train_kw = {"train": True} if _accepts_train(model) and rest else {}
    tx = optax.sgd(1e-3, momentum=0.9)
    opt = tx.init(params)
    key = jax.random.key(2)

    @jax.jit
    def infer(params, rest, x):
        return model.apply({"params": params, **rest}, x, **eval_kw)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train(params, rest, opt, x):
        def loss(p):
            out = model.apply(
                {"params": p, **rest},
                x,
                rngs={"dropout": key},
                mutable=list(rest) or False,
                **train_kw,
            )
            logits, updates = out if rest else (out, {})
            # Some models train on several heads (UniFormer's class-token logits beside the
            # pooled ones, as the official training): every head enters the loss.
            heads = jax.tree.leaves(logits)
            lse = sum(jnp.mean(jax.nn.logsumexp(h.astype(jnp.float32), -1)) for h in heads)
            return lse, updates

        (_, updates), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), {**rest, **updates}, opt

    # The training step donates its state: give it copies, inference keeps the originals.
    state = jax.tree.map(jnp.copy, {"p": params, "r": rest, "o": opt})

    def train_thunk():
        state["p"], state["r"], state["o"] = train(state["p"], state["r"], state["o"], x)
        return state["p"]

    return (lambda: infer(params, rest, x)), train_thunk


def _presets_table(quick: bool) -> str:
    batch, size = (2, 64) if quick else (8, 224)
    names = [n for n in SMALL_PRESETS if n in list_models()]
    fns = {}
    for name in names:
        infer, train = _step_fns(create_model(name), _image(name, batch, size))
        fns[f"{name}/infer"], fns[f"{name}/train"] = infer, train
    t = interleaved_medians(fns, 3 if quick else 5)
    rows = [
        f"Images/s relative to {BASELINE} in the same run; {size}², batch {batch}, fp32, XLA.\n",
        f"| model | inference vs {BASELINE} | training step vs {BASELINE} |",
        "|---|---|---|",
    ]
    for name in names:
        inf = t[f"{BASELINE}/infer"] / t[f"{name}/infer"]
        tr = t[f"{BASELINE}/train"] / t[f"{name}/train"]
        rows.append(f"| {name} | {inf:.2f}× | {tr:.2f}× |")
    return "\n".join(rows) + "\n"


def _convnext_vs_inception(quick: bool) -> str:
    batch, size = (2, 64) if quick else (8, 224)
    x = _image("inception_next_tiny", batch, size)
    models = {
        "InceptionNeXt-T": create_model("inception_next_tiny"),
        "ConvNeXt-T (MetaNeXt, 7×7 DW)": create_model(
            "inception_next_tiny", token_mixer=ConvNeXtMixer
        ),
    }
    assert all(isinstance(m, nn.Module) for m in models.values())
    fns = {}
    for label, m in models.items():
        fns[label] = _step_fns(m, x)[1]
    t = interleaved_medians(fns, 3 if quick else 5)
    base = t["ConvNeXt-T (MetaNeXt, 7×7 DW)"]
    rows = [
        f"Training images/s relative to the ConvNeXt-T form; {size}², batch {batch}, fp32.\n",
        "| model | training throughput |",
        "|---|---|",
    ]
    rows += [f"| {k} | {base / v:.2f}× |" for k, v in t.items()]
    return "\n".join(rows) + "\n"


def _sla_vs_softmax(quick: bool) -> str:
    dim, heads = 192, 3
    sla = SimplifiedLinearAttention(num_heads=heads)
    soft = nn.MultiHeadDotProductAttention(num_heads=heads)
    rows = [
        f"Forward time of one attention layer, DeiT-T width ({dim} channels, {heads} heads), "
        "batch 1, fp32; softmax / SLA (above 1: SLA is faster).\n",
        "| tokens | softmax / SLA |",
        "|---|---|",
    ]
    for n in QUICK_TOKENS if quick else TOKENS:
        side = int(round(n**0.5))
        x = jax.random.normal(jax.random.key(0), (1, n, dim))
        shape = (side, side) if side * side == n else None
        vs = sla.init(jax.random.key(1), x, shape)
        vt = soft.init(jax.random.key(1), x)
        f_sla = functools.partial(jax.jit(sla.apply, static_argnums=2), vs, x, shape)
        f_soft = functools.partial(jax.jit(soft.apply), vt, x)
        t = interleaved_medians({"sla": f_sla, "soft": f_soft}, 3 if quick else 7)
        rows.append(f"| {n} | {t['soft'] / t['sla']:.2f}× |")
    return "\n".join(rows) + "\n"


def _against_timm(quick: bool) -> str:
    try:
        import numpy as np
        import timm
        import torch

        from jaxblocks.interop.timm import load_timm_state_dict
    except ImportError:
        return "torch/timm not installed (the `torch` extra of `make test-torch`): no table.\n"
    batch, size = (2, 64) if quick else (8, 224)
    rows = [
        f"Inference, {size}², batch {batch}, fp32, same weights, {torch.get_num_threads()} torch "
        "threads; jaxblocks time / timm time (below 1: jaxblocks is faster).\n",
        "| model | jaxblocks / timm | max abs logit difference |",
        "|---|---|---|",
    ]
    for name in ("inception_next_atto", "resnet50", "nextvit_small"):
        tm = timm.create_model(name, pretrained=False).eval()
        sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        model = create_model(name)
        variables = load_timm_state_dict(name, sd)
        x = np.asarray(_image(name, batch, size))
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        eval_kw = {"train": False} if _accepts_train(model) else {}
        ours = functools.partial(jax.jit(functools.partial(model.apply, **eval_kw)), variables, x)

        def theirs(tm=tm, xt=xt):
            with torch.inference_mode():
                return tm(xt)

        diff = float(np.max(np.abs(np.asarray(ours()) - theirs().numpy())))
        t = interleaved_medians({"ours": ours, "timm": theirs}, 3 if quick else 7)
        rows.append(f"| {name} | {t['ours'] / t['timm']:.2f}× | {diff:.1e} |")
    return "\n".join(rows) + "\n"


def run(quick: bool = False) -> str:
    parts = [
        "### Small presets\n\n" + _presets_table(quick),
        "### InceptionNeXt-T vs ConvNeXt-T (same blocks, token mixer swapped)\n\n"
        + _convnext_vs_inception(quick),
        "### SLA vs softmax attention by token count\n\n" + _sla_vs_softmax(quick),
        "### jaxblocks vs timm\n\n" + _against_timm(quick),
    ]
    return "\n".join(parts)
