"""Report hooks: what the loop runs after the last stage of a config, named in ``cfg.reports``.

A report is ``fn(cfg, workdir, results) -> str``: it reads the finished stages (``results`` from
`jaxblocks.train.loop.run`), may train more through `loop.train` (never a loop of its own),
and returns a markdown table, which the loop writes to ``workdir/<name>.md`` and hands to the
caller (the CLI prints it). `REPORTS` maps names to hooks.

``"convbn_modes"`` — the `make train` job's comparison of ConvBN **tune** and **eval** mode for
transfer. You et al. (arXiv:2305.11624) show that fine-tuning with frozen BN statistics can fold
BN into the conv on the fly ("tune" mode) with exactly the numerics of "eval" mode but without
storing the normalised activations. The report trains the last stage again in eval mode (same
start, ``model.convbn_mode='eval'``) and tabulates for both: test accuracy, the XLA temporary
memory of the compiled train step (`compiled.memory_analysis().temp_size_in_bytes`) and the
median step time.

``"sr_baseline"`` — super-resolution configs: the model's held-out PSNR beside bicubic
upscaling of the same inputs.

``"pruning_sweep"`` — the run retrained at each final sparsity of ``optimizer.pruning.sweep``:
the task's main metric against the sparsity measured on the pruned parameters.

``"variants"`` — the last stage retrained once per ``config.variants`` entry: parameters and the
task's metrics. ``"mst_compression"`` — the same retraining, tabulating the binary layers'
minimum-spanning-tree length, depth and operation counts (MST-compression, paper 29).
``"volatility_baselines"`` — order-flow volatility: RMSPE of the run and its variants beside
the naive forecast and GARCH(1,1) (paper 25). ``"bct"`` — a trained LM's held-out perplexity
in float and after BCT's blockwise compression of every weight and activation (paper 60).
``"cbq"`` — a trained LM's held-out perplexity in float, round-to-nearest and after CBQ's
cross-block reconstruction at W4A8, W4A4 and W2A16 (paper 43).
``"diffusion_samples"`` — a diffusion model's samples per class: PNG grid, mean brightness
against the data, a digit classifier's accuracy on them. ``"oms_samples"`` — One More Step
(paper 23): trains the OMS module as the first variant and compares the frozen base model's
samples with and without it.
``"asdm"`` — A-SDM (paper 49): trains the pruned student's incubation stages (the variants)
by distillation from the run's teacher and compares parameters, sampling time and sample
quality.
``"pres_batch_sizes"`` — PRES (paper 19): the run and its variants (temporal batch sizes, with
and without PRES): test accuracy, AP, step time and one plot of all test-accuracy curves.
``"linear_probe"`` — self-supervised encoders (DirectPred, paper 36): logistic-regression probe
accuracy on frozen features for raw pixels, the untrained encoder, the run and its variants.
``"lmuformer_streaming"`` — a trained LMUFormer (paper 45): test accuracy in parallel and
token-by-token recurrent evaluation, and after only a prefix of each sequence.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxblocks.train import config as config_lib
from jaxblocks.train import loop
from jaxblocks.train import state as state_lib

Report = Callable[[ml_collections.ConfigDict, str, list], str]


def measure_step(
    cfg: ml_collections.ConfigDict, init_from: Any, repeats: int = 8
) -> dict[str, float]:
    """XLA temp bytes and median wall time of the default train step of ``cfg``, started from
    the variables ``init_from`` (None: fresh initialisation)."""
    tr = loop.build(cfg)
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        if init_from is not None:
            state = state_lib.start_from(state, init_from, (), sh)
        step = loop.compile_steps(tr, sh)["default"]
        batch = loop._global_batch(tr, 0)
        compiled = step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        temp = float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem else float("nan")
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
        times = []
        for i in range(repeats):
            b = loop._global_batch(tr, i + 1)
            t0 = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    return {"temp_bytes": temp, "step_s": float(np.median(times))}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| ConvBN mode | test accuracy | XLA temp memory (MiB) | step time (ms) |"
    sep = "|---|---|---|---|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['accuracy']:.4f} | {r['temp_bytes'] / 2**20:.2f} | "
            f"{r['step_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def convbn_modes(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Re-run the last stage in ConvBN eval mode and tabulate it against the stage as trained
    (its ``model.convbn_mode``, tune in the `make train` job)."""
    stages = config_lib.stage_configs(cfg)
    if len(stages) < 2 or len(results) < len(stages):
        raise ValueError(
            "report 'convbn_modes': needs a finished multi-stage (pretrain, transfer) run, got "
            f"{len(results)} finished of {len(stages)} stage(s)"
        )
    (name, last_cfg), start = stages[-1], results[-2][1].state.variables
    mode = last_cfg.model.convbn_mode or "train"
    eval_cfg = config_lib.apply_overrides(last_cfg, ["model.convbn_mode='eval'"])
    eval_res = loop.train(
        eval_cfg, os.path.join(workdir, f"{name}_eval_mode"), init_from=start,
        description=f"{name} (eval mode)",
    )  # fmt: skip
    # Measure from the pretrained weights with a fresh head, as the stage itself started.
    measured_start = dict(start, params=_drop(start["params"], last_cfg.transfer_reinit))
    rows = []
    for m, c, res in ((mode, last_cfg, results[-1][1]), ("eval", eval_cfg, eval_res)):
        acc = res.eval_metrics.get("accuracy", float("nan"))
        rows.append({"mode": m, "accuracy": acc, **measure_step(c, measured_start)})
    return format_table(rows)


def sr_baseline(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Super-resolution: the trained model's test PSNR beside bicubic upscaling of the same
    low-resolution test inputs (the baseline an SR model must beat), in dB on the luminance."""
    from jaxblocks.data.sr_images import bicubic_upscale
    from jaxblocks.train.data import make_datasets
    from jaxblocks.train.tasks import get_task

    if not results:
        raise ValueError("report 'sr_baseline': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    _, (xt, yt), _ = make_datasets(last_cfg)
    up = bicubic_upscale(jax.numpy.asarray(xt), last_cfg.data.scale)
    bicubic = float(get_task("super_resolution").metrics(up, jax.numpy.asarray(yt))["psnr"].mean())
    model = res.eval_metrics.get("psnr", float("nan"))
    return "\n".join([
        f"| method (×{last_cfg.data.scale}, {len(xt)} held-out crops) | test PSNR (dB) |",
        "|---|---|",
        f"| bicubic | {bicubic:.2f} |",
        f"| {last_cfg.model.name} ({res.final_step} steps) | {model:.2f} |",
    ])  # fmt: skip


def pruning_sweep(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Retrain the last stage at each final sparsity of ``optimizer.pruning.sweep`` (same data,
    seed and steps; the configured sparsity reuses the finished run) and tabulate the task's
    main metric with the sparsity measured on the pruned parameters."""
    import re

    from jaxblocks.compress import sparsity_of
    from jaxblocks.train.tasks import get_task

    if not results:
        raise ValueError("report 'pruning_sweep': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    levels = tuple(float(s) for s in last_cfg.optimizer.pruning.sweep)
    if not levels:
        raise ValueError("report 'pruning_sweep': set config.optimizer.pruning.sweep")
    metric = get_task(last_cfg.task).main_metric
    include = re.compile(last_cfg.optimizer.pruning.include)

    def measured(state) -> float:
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        pruned = [
            x
            for k, x in flat
            if include.search(jax.tree_util.keystr(k, simple=True, separator="/"))
        ]
        return sparsity_of(pruned)  # fmt: skip

    configured = float(last_cfg.optimizer.pruning.final)
    rows = [(configured, res)]
    for level in levels:
        if level == configured:  # the run that just finished: same config, data and seed
            continue
        c = config_lib.apply_overrides(last_cfg, [f"optimizer.pruning.final={level}"])
        rows.append((level, loop.train(c, os.path.join(workdir, f"sparsity_{level:g}"),
                                       description=f"sparsity {level:g}")))  # fmt: skip
    lines = [f"| target sparsity | measured sparsity | test {metric} | test loss |",
             "|---|---|---|---|"]  # fmt: skip
    for level, r in sorted(rows, key=lambda t: t[0]):
        lines.append(f"| {level:.2f} | {measured(r.state):.3f} | "
                     f"{r.eval_metrics.get(metric, float('nan')):.4f} | "
                     f"{r.eval_metrics.get('loss', float('nan')):.4f} |")  # fmt: skip
    return "\n".join(lines)


def _retrain_variants(cfg: ml_collections.ConfigDict, workdir: str, results, report: str):
    """(last stage's config, [(name, result)]): the run as configured, then the last stage
    retrained once per ``config.variants`` entry (its overrides applied; same data and seed)."""
    if not results:
        raise ValueError(f"report {report!r}: needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    entries = tuple(last_cfg.get("variants", ()) or ())
    if not entries:
        raise ValueError(f"report {report!r}: set config.variants")
    rows = [("as configured", res)]
    for i, v in enumerate(entries):
        name = v.get("name", f"variant {i}")
        c = config_lib.apply_overrides(last_cfg, list(v.get("overrides", ())))
        rows.append((name, loop.train(c, os.path.join(workdir, f"variant_{i}"),
                                      description=name)))  # fmt: skip
    return last_cfg, rows


def variants(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Retrain the last stage once per ``config.variants`` entry (its ``overrides`` applied; same
    data, seed and steps) and tabulate each one's parameter count and the task's test metrics
    beside the run as configured."""
    from jaxblocks.train.tasks import get_task

    last_cfg, rows = _retrain_variants(cfg, workdir, results, "variants")
    metric = get_task(last_cfg.task).main_metric
    lines = [f"| variant | parameters | test {metric} | test loss |", "|---|---|---|---|"]
    for name, r in rows:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(r.state.params))
        lines.append(f"| {name} | {n:,} | {r.eval_metrics.get(metric, float('nan')):.4f} | "
                     f"{r.eval_metrics.get('loss', float('nan')):.3g} |")  # fmt: skip
    return "\n".join(lines)


def mst_statistics(cfg: ml_collections.ConfigDict, params: Any) -> dict[str, float]:
    """MST-compression figures of the binary kernels matching ``regularizers.mst_include``:
    total tree length (differing weights), deepest tree, and XNOR/popcount operations per output
    position dense vs MST-ordered (`jaxblocks.compress.count_ops`) summed over the layers."""
    from jaxblocks.compress import binarize, count_ops, mst_plan
    from jaxblocks.train.regularizers import mst_kernels

    paths = set(mst_kernels(cfg, params))
    dense = mst = length = 0.0
    depth = 0
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "/".join(str(getattr(k, "key", k)) for k in keys) not in paths:
            continue
        bk = np.asarray(binarize(jnp.asarray(leaf)))
        bk = bk.reshape(-1, bk.shape[-1])  # [kh·kw·cin, cout]: one output position
        plan = mst_plan(bk)
        ops = count_ops(bk, plan)
        dense, mst = dense + ops["dense"], mst + ops["mst"]
        length += plan.total_distance
        depth = max(depth, plan.depth)
    return {"mst_length": length, "mst_depth": depth, "ops_dense": dense, "ops_mst": mst,
            "ops_ratio": dense / mst}  # fmt: skip


def mst_compression(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """The run and each ``config.variants`` entry (e.g. without the MST regulariser): test
    metric beside the binary layers' MST length, depth and operation counts per output
    position (dense XNOR/popcount vs MST-ordered evaluation)."""
    from jaxblocks.train.tasks import get_task

    last_cfg, rows = _retrain_variants(cfg, workdir, results, "mst_compression")
    metric = get_task(last_cfg.task).main_metric
    lines = [
        f"| variant | test {metric} | MST length | depth | ops dense | ops MST | dense / MST |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        st = mst_statistics(last_cfg, r.state.params)
        lines.append(
            f"| {name} | {r.eval_metrics.get(metric, float('nan')):.4f} | "
            f"{st['mst_length']:,.0f} | {st['mst_depth']} | {st['ops_dense']:,.0f} | "
            f"{st['ops_mst']:,.0f} | {st['ops_ratio']:.2f}× |"
        )
    return "\n".join(lines)


def volatility_baselines(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Order-flow volatility: RMSPE on the held-out intervals of the run and of each
    ``config.variants`` entry (e.g. CNN-Aggr) beside the naive forecast (this interval's realized
    volatility) and a GARCH(1,1) fitted by maximum likelihood on the training period's returns
    and filtered through the test period (Lensky & Hao's baselines)."""
    from jaxblocks.data.order_flow import fit_garch, garch_forecast, order_flow_dataset

    last_cfg, rows = _retrain_variants(cfg, workdir, results, "volatility_baselines")
    d = last_cfg.data
    kw = dict(time_bins=d.image_size, price_bins=d.image_size, interval=4 * d.image_size)
    tr = order_flow_dataset(d.num_examples, seed=last_cfg.seed, **kw)
    te = order_flow_dataset(max(d.num_examples // 4, 1), seed=last_cfg.seed + 10_000, **kw)
    y = te["target"].astype(np.float64)

    def rmspe(pred):
        return float(np.sqrt(np.mean(((pred - y) / y) ** 2)))

    params = fit_garch(tr["returns"][: d.num_examples * kw["interval"]])
    garch = garch_forecast(te["returns"], kw["interval"], params)[: len(y)]
    lines = [
        f"| method ({len(y)} held-out intervals) | test RMSPE |",
        "|---|---|",
        f"| naive (current realized volatility) | {rmspe(te['naive']):.3f} |",
        f"| GARCH(1,1) (α={params[1]:.3f}, β={params[2]:.4f}) | {rmspe(garch):.3f} |",
    ]
    for name, r in rows:
        mspe = r.eval_metrics.get("mspe", float("nan"))
        lines.append(f"| {name} | {np.sqrt(mspe):.3f} |")
    return "\n".join(lines)


def bct(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """BCT (paper 60): the trained LM's held-out loss and perplexity in float and after blockwise
    compression of every weight and activation (`jaxblocks.compress.bct_compress`) at several
    bit widths, beside the same widths with one scale per whole axis (no blocks)."""
    from jaxblocks.compress.bct import BCTRecipe, bct_compress, mean_compression
    from jaxblocks.registry import create_model
    from jaxblocks.train.data import make_datasets
    from jaxblocks.train.tasks import cross_entropy

    if not results:
        raise ValueError("report 'bct': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    _, (xt, yt), _ = make_datasets(last_cfg)
    model = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    variables = {"params": jax.device_get(res.state.params)}
    bs = int(last_cfg.eval_batch_size)

    def test_loss(m, v) -> float:
        f = jax.jit(lambda v, x, y: cross_entropy(m.apply(v, x), y)[0].mean())
        n = (len(xt) // bs) * bs
        losses = [float(f(v, xt[i : i + bs], yt[i : i + bs])) for i in range(0, n, bs)]
        return float(np.mean(losses))

    base = test_loss(model, variables)
    lines = [
        f"| model ({len(xt) // bs * bs} held-out sequences) | compression | test loss (nats) | "
        "perplexity | bits per token |",
        "|---|---|---|---|---|",
        f"| float32 | 1.00× | {base:.4f} | {np.exp(base):.3f} | {base / np.log(2):.3f} |",
    ]
    recipes = [(BCTRecipe(w, a, 64), "blocks of 64") for w, a in ((8, 8), (6, 6), (4, 8), (4, 4))]
    recipes += [(BCTRecipe(w, a, 1 << 30), "whole axis") for w, a in ((8, 8), (4, 8))]
    for recipe, how in recipes:
        qm, qv, report = bct_compress(model, variables, recipe)
        loss = test_loss(qm, qv)
        lines.append(
            f"| BCT {recipe.name}, {how} | {mean_compression(report, variables):.2f}× | "
            f"{loss:.4f} | {np.exp(loss):.3f} | {loss / np.log(2):.3f} |"
        )
    return "\n".join(lines)


# CBQ report settings (full run, smoke run): calibration sequences, Adam steps per window,
# sequences per step.
_CBQ_SETTINGS = {False: (64, 300, 4), True: (4, 2, 2)}


def cbq(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """CBQ (paper 43): the trained LM's held-out loss and perplexity in float, with
    round-to-nearest weights and after CBQ (`jaxblocks.compress.cbq.cbq_quantize`, calibrated
    on the first training sequences) at W4A8, W4A4 and W2A16 (activations per token, dynamic),
    with the mean calibration MSE of CBQ's windows for both weight roundings."""
    from jaxblocks.compress.cbq import RECIPES, cbq_quantize, quantized_apply, rtn_quantize
    from jaxblocks.registry import create_model
    from jaxblocks.train.data import make_datasets
    from jaxblocks.train.tasks import cross_entropy

    if not results:
        raise ValueError("report 'cbq': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    n_calib, steps, batch = _CBQ_SETTINGS[bool(last_cfg.smoke)]
    train, (xt, yt), _ = make_datasets(last_cfg)
    calib = jnp.asarray(train.x[:n_calib])
    model = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    variables = {"params": jax.device_get(res.state.params)}
    bs = int(last_cfg.eval_batch_size)
    n = (len(xt) // bs) * bs
    losses: dict = {}  # one compiled loss per activation quantiser

    def test_loss(apply, v) -> float:
        f = losses.setdefault(apply, jax.jit(lambda v, x, y: cross_entropy(apply(v, x), y)[0]
                                             .mean()))  # fmt: skip
        return float(np.mean([float(f(v, xt[i : i + bs], yt[i : i + bs]))
                              for i in range(0, n, bs)]))  # fmt: skip

    def row(method, loss, mse="—"):
        return (f"| {method} | {loss:.4f} | {np.exp(loss):.3f} | {np.exp(loss) - np.exp(base):+.3f}"
                f" | {mse} |")  # fmt: skip

    base = test_loss(model.apply, variables)
    lines = [
        f"| method ({n} held-out sequences; CBQ calibrated on {len(calib)}, {steps} steps per "
        "window) | test loss (nats) | perplexity | Δ perplexity | calibration window MSE |",
        "|---|---|---|---|---|",
        row("float32", base),
    ]
    for name, recipe in RECIPES.items():
        apply = quantized_apply(model, recipe)
        rq, _ = rtn_quantize(model, variables, recipe)
        cq, _, windows = cbq_quantize(
            model, variables, calib, recipe, steps=steps, batch_size=batch,
            key=jax.random.key(last_cfg.seed),
        )  # fmt: skip
        mse = {k: float(np.mean([w[k] for w in windows])) for k in ("mse_rtn", "mse_cbq")}
        lines.append(row(f"{name} round-to-nearest", test_loss(apply, rq), f"{mse['mse_rtn']:.4g}"))
        lines.append(row(f"{name} CBQ", test_loss(apply, cq), f"{mse['mse_cbq']:.4g}"))
    return "\n".join(lines)


# --- diffusion (papers 23 and 49's host model; One More Step) --------------------------------

# Sampling of the diffusion reports (full run, smoke run): DDIM steps, samples per class, CFG.
_DIFFUSION_SAMPLING = {False: (50, 16, 2.0), True: (3, 2, 2.0)}


def _diffusion_setup(last_cfg: ml_collections.ConfigDict, params: Any):
    """(model, variables, test images in [0, 1], test labels, digit-classifier proxy)."""
    from sklearn.linear_model import LogisticRegression

    from jaxblocks.registry import create_model
    from jaxblocks.train.data import make_datasets

    model = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    train, (xt, yt), _ = make_datasets(last_cfg)
    c = model.channels

    def images(packed):
        return np.clip((np.asarray(packed)[..., :c] + 1.0) / 2.0, 0.0, 1.0)

    # A logistic regression on the training images is the cheap "does it look like the digit"
    # proxy of the generated samples (as an Inception classifier is for FID/IS).
    clf = LogisticRegression(max_iter=1000)
    clf.fit(images(train.x).reshape(len(train.x), -1), train.y)
    return model, {"params": jax.device_get(params)}, images(xt), np.asarray(yt), clf


def _sample_images(model, variables, labels, seed: int, steps: int, scale: float, oms=None):
    from jaxblocks.models.diffusion_unet import generate

    run = jax.jit(lambda v, y, k: generate(model, v, y, k, num_steps=steps, guidance_scale=scale,
                                           oms=oms))  # fmt: skip
    x = run(variables, jnp.asarray(labels, jnp.int32), jax.random.key(seed))
    return np.clip((np.asarray(jax.device_get(x)) + 1.0) / 2.0, 0.0, 1.0)


def _brightness_by_class(images: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    means = images.reshape(len(images), -1).mean(1)
    return np.array([means[labels == c].mean() if np.any(labels == c) else np.nan
                     for c in range(k)])  # fmt: skip


def _save_grid(path: str, blocks: list[tuple[str, np.ndarray]], k: int, per_row: int) -> None:
    """One PNG: a row per class, a block of ``per_row`` images per titled method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = []
    for _, imgs in blocks:  # imgs [k, n, H, W, C]
        b = imgs[:, :per_row, ..., 0]  # [k, n, H, W]
        h, w = b.shape[2:]
        pad = np.pad(b, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.5)
        cols.append(pad.transpose(0, 2, 1, 3).reshape(k * (h + 2), -1))
    fig, axes = plt.subplots(1, len(blocks), figsize=(0.5 * per_row * len(blocks) + 1, 0.5 * k + 1))
    for ax, (title, _), img in zip(np.atleast_1d(axes), blocks, cols, strict=True):
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_class(images: np.ndarray, k: int, n: int) -> np.ndarray:
    return images.reshape(k, n, *images.shape[1:])


def diffusion_samples(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Sample every class with the trained diffusion model (DDIM, classifier-free guidance),
    save the grid as ``workdir/diffusion_samples.png`` and tabulate per class the samples' mean
    brightness against the test images' and a digit classifier's accuracy on the samples given
    their labels (logistic regression on the training images; its test accuracy for scale)."""
    if not results:
        raise ValueError("report 'diffusion_samples': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    steps, n, scale = _DIFFUSION_SAMPLING[bool(last_cfg.smoke)]
    model, variables, xt, yt, clf = _diffusion_setup(last_cfg, res.state.params)
    k = model.num_classes
    labels = np.repeat(np.arange(k), n)
    x = _sample_images(model, variables, labels, last_cfg.seed, steps, scale)
    pred = clf.predict(x.reshape(len(x), -1))
    data_b, samp_b = _brightness_by_class(xt, yt, k), _brightness_by_class(x, labels, k)
    if jax.process_index() == 0:
        data = np.stack([xt[yt == c][:n] for c in range(k)]) if all(
            np.sum(yt == c) >= n for c in range(k)) else _per_class(x, k, n)  # fmt: skip
        blocks = [("test images", data), ("samples", _per_class(x, k, n))]
        _save_grid(os.path.join(workdir, "diffusion_samples.png"), blocks, k, min(n, 8))
    test_acc = clf.score(xt.reshape(len(xt), -1), yt)
    lines = [
        f"| class | test mean brightness | sample mean brightness | classifier accuracy on "
        f"samples ({n} per class, {steps} DDIM steps, CFG {scale:g}) |",
        "|---|---|---|---|",
    ]
    for c in range(k):
        acc = float(np.mean(pred[labels == c] == c))
        lines.append(f"| {c} | {data_b[c]:.3f} | {samp_b[c]:.3f} | {acc:.2f} |")
    lines.append(f"| all | {xt.mean():.3f} | {x.mean():.3f} | {np.mean(pred == labels):.3f} "
                 f"(the classifier's test accuracy: {test_acc:.3f}) |")  # fmt: skip
    return "\n".join(lines) + "\n\n![samples](diffusion_samples.png)"


def oms_samples(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """One More Step (paper 23): the run is the frozen base model (non-zero terminal SNR); the
    first ``config.variants`` entry trains the OMS module (time-free, zero-SNR step only) with
    the same trainer. Tabulates per class the mean brightness of the test images, of the base
    model's samples from x_T ~ N(0, I), of base + OMS (same label) and of base + OMS given the
    class of most different brightness (low-frequency control), with the digit classifier's
    accuracy; saves the grid as ``workdir/oms_samples.png``."""
    from jaxblocks.models.diffusion_unet import schedule_of

    last_cfg, rows = _retrain_variants(cfg, workdir, results, "oms_samples")
    base_res, oms_res = rows[0][1], rows[1][1]
    oms_cfg = config_lib.apply_overrides(last_cfg, list(last_cfg.variants[0].get("overrides", ())))
    steps, n, scale = _DIFFUSION_SAMPLING[bool(last_cfg.smoke)]
    model, variables, xt, yt, clf = _diffusion_setup(last_cfg, base_res.state.params)
    oms_model, oms_vars, *_ = _diffusion_setup(oms_cfg, oms_res.state.params)
    k = model.num_classes
    digits = len(last_cfg.data.classes)
    labels = np.repeat(np.arange(k), n)
    data_b = _brightness_by_class(xt, yt, k)
    far = np.array([int(np.nanargmax(np.abs(data_b - data_b[c]))) for c in range(k)])
    seed = last_cfg.seed

    def run(oms_labels):
        oms = None if oms_labels is None else (oms_model, oms_vars, jnp.asarray(oms_labels), scale)
        return _sample_images(model, variables, labels, seed, steps, scale, oms)

    methods = [("base, x_T ~ N(0, I)", run(None)), ("base + OMS", run(labels)),
               ("base + OMS(far class)", run(far[labels]))]  # fmt: skip
    bright = [_brightness_by_class(x, labels, k) for _, x in methods]
    digit_acc = [clf.predict(x.reshape(len(x), -1)) % digits == labels % digits
                 for _, x in methods]  # fmt: skip
    if jax.process_index() == 0:
        _save_grid(os.path.join(workdir, "oms_samples.png"),
                   [(t, _per_class(x, k, n)) for t, x in methods], k, min(n, 6))  # fmt: skip
    ab = schedule_of(model)
    lines = [
        f"| class | test brightness | {' | '.join(t for t, _ in methods)} | OMS class |",
        "|---|---|---|---|---|---|",
    ]
    for c in range(k):
        lines.append(f"| {c} | {data_b[c]:.3f} | "
                     + " | ".join(f"{b[c]:.3f}" for b in bright) + f" | {far[c]} |")  # fmt: skip
    err = [float(np.nanmean(np.abs(b - data_b))) for b in bright[:2]]
    lines.append(f"| mean abs. brightness error | — | {err[0]:.3f} | {err[1]:.3f} | — | — |")
    accs = " | ".join(f"{float(np.mean(a)):.3f}" for a in digit_acc)
    lines.append(f"| digit classifier accuracy | — | {accs} | — |")
    return (
        "\n".join(lines)
        + f"\n\nBase schedule: ᾱ at its last training step {ab[-1]:.4f} (terminal SNR "
        f"{ab[-1] / (1 - ab[-1]):.4f}); OMS bridges to ᾱ_T' = {ab[-1]:.4f} with "
        f"{n} samples per class, {steps} DDIM steps, CFG {scale:g} for both. OMS module test "
        f"loss {oms_res.eval_metrics.get('loss', float('nan')):.4f}.\n\n![samples](oms_samples.png)"
    )


def asdm(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """A-SDM (paper 49): the run is the teacher; each ``config.variants`` entry is one
    progressive-incubation stage of the pruned student (``asdm_unet_digits``, task
    ``diffusion_distill``), started from the previous stage's student by
    `jaxblocks.models.asdm_unet.prune_unet` with the frozen teacher in its ``"teacher"``
    collection. Tabulates teacher vs final student: parameters, sampling wall time for the same
    DDIM steps (median of interleaved runs), test v-MSE, the digit classifier's accuracy and
    mean confidence on their samples; saves both sample grids as ``workdir/asdm_samples.png``."""
    from jaxblocks.models.asdm_unet import block_redundancy, prune_unet
    from jaxblocks.models.diffusion_unet import generate
    from jaxblocks.registry import create_model

    if not results:
        raise ValueError("report 'asdm': needs a finished run")
    (_, last_cfg), t_res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    stages = tuple(last_cfg.get("variants", ()) or ())
    if not stages:
        raise ValueError("report 'asdm': set config.variants (the incubation stages)")
    teacher_params = jax.device_get(t_res.state.params)
    params, removed, hosts, s_res, s_cfg = teacher_params, (), set(), None, None
    for i, st in enumerate(stages):
        s_cfg = config_lib.apply_overrides(last_cfg, list(st.get("overrides", ())))
        kw = dict(s_cfg.model.kwargs)
        new = tuple(b for b in kw.get("removed", ()) if b not in removed)
        cc = [(h, tuple(d)) for h, d in kw.get("condconv", ()) if h not in hosts]
        params = prune_unet({"params": params}, new, cc, donors=teacher_params)["params"]
        init = {"params": params, "teacher": {"params": teacher_params}}
        s_res = loop.train(s_cfg, os.path.join(workdir, f"asdm_stage_{i}"), init_from=init,
                           description=st.get("name", f"stage {i}"))  # fmt: skip
        params = jax.device_get(s_res.state.params)
        removed, hosts = tuple(kw.get("removed", ())), hosts | {h for h, _ in cc}
    steps, n, scale = _DIFFUSION_SAMPLING[bool(last_cfg.smoke)]
    teacher, t_vars, xt, yt, clf = _diffusion_setup(last_cfg, teacher_params)
    student = create_model(s_cfg.model.name, **dict(s_cfg.model.kwargs))
    k = teacher.num_classes
    labels = jnp.asarray(np.repeat(np.arange(k), n), jnp.int32)
    key = jax.random.key(last_cfg.seed)
    runs = [jax.jit(lambda v, y, kk, m=m: generate(m, v, y, kk, num_steps=steps,
                                                   guidance_scale=scale))
            for m in (teacher, student)]  # fmt: skip
    args = [(t_vars, labels, key), ({"params": params}, labels, key)]
    samples = [np.asarray(jax.device_get(r(*a))) for r, a in zip(runs, args, strict=True)]
    times: list[list[float]] = [[], []]
    for _ in range(3 if last_cfg.smoke else 11):  # interleaved: load drifts hit both alike
        for j in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(runs[j](*args[j]))
            times[j].append(time.perf_counter() - t0)
    med = [float(np.median(t)) for t in times]
    lines = [
        f"| model | parameters | sampling time ({k * n} samples, {steps} DDIM steps, CFG "
        f"{scale:g}) | test v-MSE | classifier accuracy on samples | mean confidence |",
        "|---|---|---|---|---|---|",
    ]
    grids = []
    for name, x, p, res, tm in (("teacher", samples[0], teacher_params, t_res, med[0]),
                                ("A-SDM student", samples[1], params, s_res, med[1])):  # fmt: skip
        img = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
        flat = img.reshape(len(img), -1)
        acc = float(np.mean(clf.predict(flat) == np.asarray(labels)))
        conf = float(np.mean(clf.predict_proba(flat)[np.arange(len(flat)), np.asarray(labels)]))
        n_par = sum(int(np.size(a)) for a in jax.tree.leaves(p))
        mse = res.eval_metrics.get("mse", float("nan"))
        lines.append(f"| {name} | {n_par:,} | {tm * 1e3:.1f} ms | {mse:.4f} | {acc:.3f} | "
                     f"{conf:.3f} |")  # fmt: skip
        grids.append((name, _per_class(img, k, n)))
    lines.append(f"\nStudent sampling speed-up: {100 * (1 - med[1] / med[0]):.1f}% less time "
                 f"(the paper: UNet 22% faster); incubation stages: "
                 f"{', '.join(st.get('name', '?') for st in stages)}.")  # fmt: skip
    if not last_cfg.smoke:
        x0 = jnp.asarray(xt[:64] * 2.0 - 1.0, jnp.float32)
        tt = jnp.full((x0.shape[0],), teacher.num_timesteps // 2, jnp.int32)
        scores = block_redundancy(student, t_vars, x0, tt, jnp.asarray(yt[:64], jnp.int32))
        lines.append("\nTeacher block redundancy (relative output change when skipped, t = T/2): "
                     + ", ".join(f"{b} {v:.4f}" for b, v in sorted(scores.items(),
                                                               key=lambda kv: kv[1])))  # fmt: skip
    if jax.process_index() == 0:
        _save_grid(os.path.join(workdir, "asdm_samples.png"), grids, k, min(n, 8))
    return "\n".join(lines) + "\n\n![samples](asdm_samples.png)"


def video_fitting(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """HNeRV / NeRV++ video fitting (papers 32, 55): the fitted model's PSNR per frame (mean,
    min) in float, with its embeddings quantised to 6 bits and with the decoder weights
    quantised to 8 bits too (the official defaults), and the stored bits per pixel
    (`jaxblocks.models.hnerv.evaluate_video`)."""
    from jaxblocks.models.hnerv import evaluate_video
    from jaxblocks.registry import create_model
    from jaxblocks.train.data import make_datasets

    if not results:
        raise ValueError("report 'video_fitting': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    eb, mb = 6, 8  # the official --quant_embed_bit 6 --quant_model_bit 8
    _, (frames, _), _ = make_datasets(last_cfg)
    model = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    r = evaluate_video(model, {"params": jax.device_get(res.state.params)}, frames, eb, mb)
    n, h, w = frames.shape[:3]
    lines = [
        f"| {last_cfg.model.name} ({n} frames {h}×{w}, {res.final_step} steps) | PSNR mean (dB)"
        " | PSNR min (dB) | bits per pixel |",
        "|---|---|---|---|",
    ]
    for label, key, bpp in (("float32", "psnr", "—"),
                            (f"embeddings {eb}-bit", "psnr_embed_q", "—"),
                            (f"embeddings {eb}-bit + decoder {mb}-bit", "psnr_all_q",
                             f"{r['bpp']:.3f}")):  # fmt: skip
        p = np.asarray(r[key])
        lines.append(f"| {label} | {p.mean():.2f} | {p.min():.2f} | {bpp} |")
    return "\n".join(lines) + (
        f"\n\nStored: {r['embedding_values']:,} embedding values + {r['decoder_params']:,} "
        "decoder parameters (fixed-length codes with a float16 min and scale per tensor; the "
        "official entropy-codes them, so its bpp is lower)."
    )


def pres_batch_sizes(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """PRES (paper 19): the run (e.g. small temporal batches without PRES) and each
    ``config.variants`` entry (e.g. large batches without / with PRES) retrained; a table of
    test accuracy, AP, median step time and sequential memory steps per window, and all test
    accuracy curves in one plot, ``workdir/pres_batch_sizes.png``."""
    from jaxblocks.train.metrics import read_metrics

    last_cfg, rows = _retrain_variants(cfg, workdir, results, "pres_batch_sizes")
    lines = ["| run | temporal batch | PRES | test accuracy | test AP | step s | memory steps |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    curves = []
    for i, (name, r) in enumerate(rows):
        c = last_cfg if i == 0 else config_lib.apply_overrides(
            last_cfg, list(last_cfg.variants[i - 1].get("overrides", ())))  # fmt: skip
        kw = c.model.kwargs
        b = int(kw.get("temporal_batch", 1))
        if i == 0:
            name = f"b={b}, {'PRES' if kw.get('use_pres', False) else 'no PRES'} (the run)"
        m = r.eval_metrics
        step_s = r.timings.get("step_s", float("nan"))
        step_s = "n/a (resumed)" if step_s != step_s else f"{step_s:.3f}"
        pres = (f"γ {kw.get('pres_gamma', 0.9)}, {kw.get('pres_mode', 'official')}"
                if kw.get("use_pres", False) else "no")  # fmt: skip
        lines.append(f"| {name} | {b} | {pres} | "
                     f"{m.get('accuracy', float('nan')):.4f} | {m.get('ap', float('nan')):.4f} | "
                     f"{step_s} | {c.data.seq_len // b} |")  # fmt: skip
        recs = read_metrics(os.path.join(r.workdir, "metrics.jsonl"))
        curves.append((name, [(x["step"], x["accuracy"]) for x in recs
                              if x["split"] == "eval" and "accuracy" in x]))  # fmt: skip
    if jax.process_index() == 0:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in curves:
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=name, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("test link-prediction accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "pres_batch_sizes.png"), dpi=100)
        plt.close(fig)
    return "\n".join(lines) + "\n\n![accuracy](pres_batch_sizes.png)"


def linear_probe(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Self-supervised encoders (DirectPred, paper 36): test accuracy of a logistic-regression
    probe fitted on the frozen online-encoder features of the labelled training split
    (standardised; `jaxblocks.models.byol.encode`), for the untrained encoder, the run and
    each ``config.variants`` entry (e.g. a learned predictor), beside raw pixels."""
    import flax.linen as nn
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from jaxblocks.models.byol import encode
    from jaxblocks.registry import create_model
    from jaxblocks.train.data import make_datasets

    if not results:
        raise ValueError("report 'linear_probe': needs a finished run")
    last_cfg = config_lib.stage_configs(cfg)[-1][1]
    entries = tuple(last_cfg.get("variants", ()) or ())
    rows = (_retrain_variants(cfg, workdir, results, "linear_probe")[1] if entries
            else [("as configured", results[-1][1])])  # fmt: skip
    cfgs = [last_cfg] + [config_lib.apply_overrides(last_cfg, list(v.get("overrides", ())))
                         for v in entries]  # fmt: skip
    train, (xt, yt), _ = make_datasets(last_cfg)
    x, y = np.asarray(train.x), np.asarray(train.y)
    bs = int(last_cfg.eval_batch_size)

    def probe(fx, fxt) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return float(clf.fit(fx.reshape(len(fx), -1), y).score(fxt.reshape(len(fxt), -1), yt))

    def accuracy(model, variables) -> float:
        f = jax.jit(lambda v, a: encode(model, v, a))
        emb = [np.concatenate([np.asarray(f(variables, a[i : i + bs]))
                               for i in range(0, len(a), bs)]) for a in (x, xt)]  # fmt: skip
        return probe(*emb)

    first = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    untrained = nn.unbox(jax.jit(first.init)(jax.random.key(last_cfg.seed), jnp.asarray(x[:2])))
    lines = [f"| encoder ({len(x)} labelled train / {len(xt)} test images) | predictor | "
             "test SSL cosine | linear-probe test accuracy |", "|---|---|---|---|",
             f"| raw pixels | — | — | {probe(x, xt):.4f} |",
             f"| {first.encoder}, untrained | — | — | "
             f"{accuracy(first, untrained):.4f} |"]  # fmt: skip
    for (name, r), c in zip(rows, cfgs, strict=True):
        model = create_model(c.model.name, **dict(c.model.kwargs))
        v = {"params": jax.device_get(r.state.params), **jax.device_get(r.state.collections)}
        lines.append(f"| {model.encoder}, {name} ({r.final_step} steps) | {model.predictor} | "
                     f"{r.eval_metrics.get('cosine', float('nan')):.4f} | "
                     f"{accuracy(model, v):.4f} |")  # fmt: skip
    return "\n".join(lines)


def lmuformer_streaming(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """LMUFormer (paper 45): the trained sequence classifier's test accuracy evaluated in
    parallel and recurrently (token by token, ``mode="recurrent"``; the largest logit gap), and
    when only the first 25/50/75 % of each test sequence has been seen (the decision so far)."""
    from jaxblocks.registry import create_model
    from jaxblocks.train.data import eval_batches, make_datasets

    if not results:
        raise ValueError("report 'lmuformer_streaming': needs a finished run")
    (_, last_cfg), res = config_lib.stage_configs(cfg)[-1], results[-1][1]
    _, (xt, yt), _ = make_datasets(last_cfg)
    xt, yt = np.asarray(xt)[:1024], np.asarray(yt)[:1024]
    model = create_model(last_cfg.model.name, **dict(last_cfg.model.kwargs))
    variables = {"params": res.state.params, **dict(res.state.collections)}
    fn = jax.jit(lambda x, mode: model.apply(variables, x, train=False, mode=mode),
                 static_argnums=1)  # fmt: skip

    def logits(t: int, mode: str | None) -> np.ndarray:
        out = [np.asarray(fn(jnp.asarray(b["x"][:, :t]), mode))[b["w"] > 0]
               for b in eval_batches(xt, yt, last_cfg.eval_batch_size)]  # fmt: skip
        return np.concatenate(out)

    seq = xt.shape[1]
    par, rec = logits(seq, None), logits(seq, "recurrent")
    gap = float(np.abs(par - rec).max())
    lines = [f"| {last_cfg.model.name} ({len(yt)} test sequences of {seq} steps) | test accuracy |",
             "|---|---|",
             f"| parallel | {(par.argmax(-1) == yt).mean():.4f} |",
             f"| recurrent (token by token) | {(rec.argmax(-1) == yt).mean():.4f} |"]  # fmt: skip
    for frac in (0.25, 0.5, 0.75):
        t = max(int(round(frac * seq)), 1)
        acc = (logits(t, None).argmax(-1) == yt).mean()
        lines.append(f"| first {frac:.0%} seen ({t} steps) | {acc:.4f} |")
    return "\n".join(lines) + f"\n\nLargest |parallel − recurrent| logit gap: {gap:.2e}."


REPORTS: dict[str, Report] = {
    "variants": variants,
    "convbn_modes": convbn_modes,
    "sr_baseline": sr_baseline,
    "pruning_sweep": pruning_sweep,
    "mst_compression": mst_compression,
    "volatility_baselines": volatility_baselines,
    "bct": bct,
    "cbq": cbq,
    "diffusion_samples": diffusion_samples,
    "oms_samples": oms_samples,
    "asdm": asdm,
    "video_fitting": video_fitting,
    "pres_batch_sizes": pres_batch_sizes,
    "linear_probe": linear_probe,
    "lmuformer_streaming": lmuformer_streaming,
}


def run_reports(cfg: ml_collections.ConfigDict, workdir: str, results) -> dict[str, str]:
    """Run every report named in ``cfg.reports``; each table is also written to
    ``workdir/<name>.md``. Returns ``{name: table}``."""
    out = {}
    for name in tuple(cfg.get("reports", ())):
        if name not in REPORTS:
            raise ValueError(f"config.reports: unknown report {name!r}; known: {sorted(REPORTS)}")
        table = REPORTS[name](cfg, workdir, results)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"{name}.md"), "w") as f:
                f.write(table + "\n")
        out[name] = table
    return out


def _drop(params: dict, names) -> dict:
    return {k: v for k, v in params.items() if k not in tuple(names)}
