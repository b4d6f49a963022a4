"""The registry test: every registered model, whoever added it.

For each name in `list_models()`: `jax.eval_shape` of the preset's init (no allocation), its
parameter count equal to the published one its registration declares (`ModelInfo`), and the
metadata itself. Then, on the model built with its registration's ``tiny`` overrides (at most
`FULL_CHECK_MAX_PARAMS`, so every preset's structure runs, however large the preset): init,
apply under `jit`, finite (and not all zero) gradients of a scalar loss, and
``dtype=jnp.bfloat16`` followed by the outputs and the activations (parameters stay fp32).
Models built from `ConvBN`/`LinearBN` are also switched between modes with `convbn_mode`, in the
same test after the gradient check: train updates the running statistics, tune gives eval's
outputs, and deploy after `fold_for_deploy` gives eval's outputs.

Presets whose ``tiny`` overrides build the same module (same class and fields, same example
input) share one runtime check: a family's presets usually differ only in fields the overrides
set, so the check is run once per distinct tiny model (`RUNTIME_GROUPS`), named after all of them.
The per-name checks (published count, ``eval_shape`` of the full preset) still run for each name.
In the fast suite the compiled checks (init/apply/grad, ConvBN modes) run for the first group of
each model class; the other presets of a class (e.g. MCUNet in1-in4 after in0, which differ in
their block tables, already built by their ``eval_shape`` checks) run under `make test-slow`.

Compiles use XLA's backend optimization level 0: these are correctness checks on tiny inputs,
and unoptimized code compiles about twice as fast on CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.conv_bn import ConvBN, LinearBN, convbn_mode, fold_for_deploy
from jaxblocks.registry import ModelInfo, create_model, example_input, list_models, model_info
from tests.kernels.harness import assert_close, leaves_changed

MODELS = list_models()
FULL_CHECK_MAX_PARAMS = 2_000_000
# Tune folds BN into the kernel (reassociated fp32 sums), deploy stores the fold: ~1e-6 apart.
MODE_TOL = 1e-4
# Models whose final output is fp32 by design even with dtype=bf16 (their activations are still
# checked to follow dtype). Keep the reason next to the name.
FP32_OUTPUT_MODELS = {
    "char_lm_tiny": "LM logits are computed in fp32 for a stable softmax",
}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _tiny(name: str):
    """(model, example input) of ``name`` with its registration's ``tiny`` overrides."""
    tiny = model_info(name).tiny
    return create_model(name, **tiny), example_input(name, **tiny)


def _float_leaves(tree) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


@functools.cache
def _abstract(name: str, tiny: bool = False):
    """(abstract variables, uses ConvBN/LinearBN, abstract outputs) from one `eval_shape` of
    ``init_with_output``: init's forward pass gives the outputs, so no second trace of apply
    (which took as long again for the larger presets)."""
    model, x = _tiny(name) if tiny else (create_model(name), example_input(name))
    uses_convbn = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvBN | LinearBN):
            uses_convbn.append(True)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        out, abstract = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    return nn.unbox(abstract), bool(uses_convbn), out


def _n_params(name: str, tiny: bool = False) -> int:
    params = _abstract(name, tiny)[0]["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _uses_convbn(name: str) -> bool:
    """Whether the tiny model has `ConvBN`/`LinearBN` layers (found by tracing its init, so this
    runs inside tests: at collection every xdist worker would trace all the models)."""
    return _abstract(name, tiny=True)[1]


def _runtime_groups(names: list[str]) -> list[tuple[str, ...]]:
    """Names grouped by their tiny model (module repr, which lists every field, and input)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        try:
            tiny = model_info(name).tiny
            model = create_model(name, **tiny)
            x = jax.eval_shape(functools.partial(example_input, name, **tiny))  # no arrays yet
            shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), x)
            key = (repr(model), str(shapes))
        except Exception:  # a broken model fails in its own group, not at collection
            key = (name, "")
        groups.setdefault(key, []).append(name)
    return [tuple(g) for g in groups.values()]


RUNTIME_GROUPS = _runtime_groups(MODELS)


def _group_id(group: tuple[str, ...]) -> str:
    return "-".join(group)


# Presets of an already-checked class that take another code path (normalisation, recurrent
# cell, spiking neurons, heads, token mixer): checked in the fast suite too.
OTHER_PATH_VARIANTS = {
    "gla_lm_tiny", "slstm_lm_tiny", "transformer_lm_tiny", "spiking_lmuformer_gsc",
    "spiking_lmuformer_ms_gsc", "resnet18_ghost_bn", "resnet50_evonorm_s0", "resnet50_evonorm_b0",
    "resnet50_gn_ws", "resnet50_bcn_ws", "order_flow_cnn_aggr", "wave_cnn_one_way", "byol_linear",
    "temporal_inception_clips", "ts_lstm_clips", "tgn_wikipedia",
}  # fmt: skip


# Groups whose compiled check is slow for what it adds, with where the fast suite covers them.
SLOW_RUNTIME = {
    # 20k HLO ops from the Poincaré maps: ~40 s to compile the tiny model's gradient at -O0;
    # test_poincare_resnet.py checks a residual block's jitted gradient
    "hyperbolic_resnet20",
    # Two stacked complex U-Nets with complex FSMNs: ~30-55 s to compile the tiny model's
    # gradient; the frcrn_denoise smoke run (test_configs_smoke.py) trains frcrn_tiny's 2-level
    # U-Nets through the trainer, and test_frcrn.py checks the forward, masks and train mode
    "frcrn",
}


def _first_per_class(groups: list[tuple[str, ...]]) -> list:
    """``groups`` as pytest params, all but the first group of each model class (and the
    `OTHER_PATH_VARIANTS`) marked slow, and the `SLOW_RUNTIME` groups."""
    seen, out = set(), []
    for g in groups:
        cls = type(create_model(g[0])).__name__
        slow = (cls in seen and not OTHER_PATH_VARIANTS & set(g)) or bool(SLOW_RUNTIME & set(g))
        out.append(pytest.param(g, id=_group_id(g), marks=[pytest.mark.slow] if slow else []))
        seen.add(cls)
    return out


@functools.cache
def _initialized(name: str):
    """Real (jitted) init of the tiny model, shared by the tests of one model in a worker."""
    model, x = _tiny(name)
    return nn.unbox(jit(model.init)(jax.random.key(0), x))


def _apply(model, variables, x, **kwargs):
    """Apply with every non-param collection mutable (train-mode BN): (outputs, updates)."""
    mutable = [c for c in variables if c != "params"]
    if not mutable:
        return model.apply(variables, x, **kwargs), {}
    return model.apply(variables, x, mutable=mutable, **kwargs)


def _scalar_loss(out) -> jax.Array:
    return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in _float_leaves(out))


def test_expected_models_are_registered():
    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2"):
        assert name in MODELS
    assert all(_uses_convbn(n) for n in ("resnet18", "resnet50", "mobilenet_v2"))
    assert not _uses_convbn("gla_lm_tiny")
    assert set(FP32_OUTPUT_MODELS) <= set(MODELS), "stale FP32_OUTPUT_MODELS entry"


@pytest.mark.parametrize("name", MODELS)
def test_tiny_overrides_give_a_small_model_of_the_same_family(name):
    n = _n_params(name, tiny=True)
    assert n <= FULL_CHECK_MAX_PARAMS, (
        f"{name}: {n:,} parameters with tiny={dict(model_info(name).tiny)}; register tiny= "
        f"overrides giving at most {FULL_CHECK_MAX_PARAMS:,} so the runtime checks stay cheap"
    )
    assert type(_tiny(name)[0]) is type(create_model(name))


def test_list_models_filters_and_describes():
    assert list_models("resnet5*") == sorted(n for n in MODELS if n.startswith("resnet5"))
    assert "resnet50" in list_models("resnet5*") and "resnet18" not in list_models("resnet5*")
    assert list_models("no_such_model*") == []
    infos = list_models("resnet*", describe=True)
    assert [i.name for i in infos] == list_models("resnet*")
    r50 = model_info("resnet50")
    assert r50.arxiv == "1512.03385" and r50.published_params == 25_557_032
    assert r50.paper.url == "https://arxiv.org/abs/1512.03385"
    with pytest.raises(KeyError, match="model_info: unknown model 'resnet5'"):
        model_info("resnet5")
    # overrides reach the example input where it depends on the config
    assert int(example_input("gla_lm_tiny", vocab_size=7).max()) < 7


def _check_published_count(name: str) -> None:
    """The full preset's parameter count against the published one its docstring cites."""
    info = model_info(name)
    assert isinstance(info, ModelInfo) and info.name == name
    assert info.params_source.strip(), f"{name}: say where the parameter count comes from"
    if info.published_params is None:
        assert "no " in info.params_source.lower(), (
            f"{name}: published_params=None needs params_source to say why there is none"
        )
        return
    assert info.paper is not None, f"{name}: a published count needs its Paper"
    n = _n_params(name)
    tol = info.params_rtol * info.published_params
    assert abs(n - info.published_params) <= tol, (
        f"{name}: {n:,} parameters, published {info.published_params:,} "
        f"({info.params_source}; rtol {info.params_rtol})"
    )


@pytest.mark.parametrize("name", MODELS)
def test_eval_shape_and_published_param_count(name):
    """Full-size preset through `jax.eval_shape` only: its parameter count equals the published
    one (one eval_shape serves both checks), and the forward gives batch-leading float outputs
    (the runtime tests below apply the tiny models for real)."""
    _check_published_count(name)
    abstract, _, out = _abstract(name)
    assert "params" in abstract
    leaves = jax.tree.leaves(abstract)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    n = _n_params(name)
    print(f"{name}: {n:,} parameters")
    assert n > 0
    assert _float_leaves(out), f"{name}: no floating-point output"
    batch = jax.tree.leaves(example_input(name))[0].shape[0]
    assert all(x.shape[0] == batch for x in jax.tree.leaves(out))


def test_runtime_groups_cover_every_model():
    assert OTHER_PATH_VARIANTS <= set(MODELS) and SLOW_RUNTIME <= set(MODELS)
    covered = [n for g in RUNTIME_GROUPS for n in g]
    assert sorted(covered) == sorted(MODELS)
    assert len(set(covered)) == len(covered)
    for group in RUNTIME_GROUPS:
        reprs = {repr(_tiny(n)[0]) for n in group}
        assert len(reprs) == 1, f"{group}: different tiny models in one group"
    # the dedup must not hide a family whose tiny models differ
    assert not any({"resnet18", "resnet50"} <= set(g) for g in RUNTIME_GROUPS)


@pytest.mark.parametrize("group", _first_per_class(RUNTIME_GROUPS))
def test_init_apply_jit_finite_grads(group):
    name = group[0]
    model, x = _tiny(name)
    variables = _initialized(name)
    params = variables["params"]
    rest = {c: v for c, v in variables.items() if c != "params"}
    assert jax.tree.structure(params) == jax.tree.structure(_abstract(name, True)[0]["params"])

    @jit
    def loss_and_grad(params, rest, x):
        def loss(p):
            out, _ = _apply(model, {"params": p, **rest}, x)
            return _scalar_loss(out)

        return jax.value_and_grad(loss)(params)

    loss, grads = loss_and_grad(params, rest, x)
    assert np.isfinite(float(loss)), f"{name}: non-finite loss {loss}"
    g = [np.asarray(leaf, np.float32) for leaf in _float_leaves(grads)]  # numpy: no compiles
    assert g, f"{name}: no gradients"
    for leaf in g:
        assert np.all(np.isfinite(leaf)), f"{name}: non-finite gradient"
    assert any(np.max(np.abs(leaf)) > 0 for leaf in g), f"{name}: all gradients zero"
    if _uses_convbn(name):
        _check_convbn_mode_switching(name, model, x, variables)


@pytest.mark.parametrize("group", RUNTIME_GROUPS, ids=_group_id)
def test_dtype_bf16_followed(group):
    name = group[0]
    tiny = model_info(name).tiny
    x = example_input(name, **tiny)
    model = create_model(name, dtype=jnp.bfloat16, **tiny)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    for leaf in jax.tree.leaves(abstract["params"]):
        assert leaf.dtype == jnp.float32, f"{name}: params must stay fp32 with dtype=bf16"

    def run(v):
        mutable = ["intermediates"] + [c for c in v if c != "params"]
        return model.apply(v, x, capture_intermediates=True, mutable=mutable)

    out, state = jax.eval_shape(run, abstract)
    want = jnp.float32 if name in FP32_OUTPUT_MODELS else jnp.bfloat16
    for leaf in _float_leaves(out):
        assert leaf.dtype == want, f"{name}: output dtype {leaf.dtype}, expected {want.__name__}"
    inner = _float_leaves(state["intermediates"])
    assert any(leaf.dtype == jnp.bfloat16 for leaf in inner), f"{name}: no bf16 activations"


def _perturb(tree, seed: int):
    """Non-trivial BN affine parameters (init has scale 1, bias 0) so the fold is exercised.
    Drawn with numpy: with `jax.random` each distinct leaf shape compiled its own draw (~5 s
    for MCUNet's tiny model)."""
    rng = np.random.default_rng(seed)

    def one(x):
        if x.ndim != 1:
            return x
        return jnp.asarray(np.asarray(x) + 0.2 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(one, tree)


def _check_convbn_mode_switching(name, model, x, variables):
    """For models with ConvBN/LinearBN layers (run by `test_init_apply_jit_finite_grads`)."""
    params = _perturb(variables["params"], seed=1)

    @jit
    def train(variables, x):
        with convbn_mode("train"):
            return _apply(model, variables, x)

    @jit
    def inference_modes(trained, x):
        # one program for the three inference modes: one compile instead of three
        with convbn_mode("eval"):
            out_eval, _ = _apply(model, trained, x)
        with convbn_mode("tune"):
            out_tune, _ = _apply(model, trained, x)
        with convbn_mode("deploy"):
            out_deploy, _ = _apply(model, fold_for_deploy(trained), x)
        return out_eval, out_tune, out_deploy

    out_train, updates = train({**variables, "params": params}, x)
    stats = updates["batch_stats"]
    moved = leaves_changed(stats, variables["batch_stats"])
    assert all(jax.tree.leaves(moved)), f"{name}: train mode did not update every running stat"

    trained = {**variables, "params": params, "batch_stats": stats}
    out_eval, out_tune, out_deploy = inference_modes(trained, x)
    assert_close(out_tune, out_eval, tol=MODE_TOL, name=f"{name} tune vs eval")
    assert_close(out_deploy, out_eval, tol=MODE_TOL, name=f"{name} deploy vs eval")
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))),
        out_train,
        out_eval,
    )
    assert max(jax.tree.leaves(diffs)) > 1e-3, f"{name}: train and eval outputs are equal"
