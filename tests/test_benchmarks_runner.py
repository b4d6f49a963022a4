"""The benchmark runner's arguments (with a fake benchmark) and running it from any directory."""

import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import run

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(monkeypatch):
    """A registered benchmark ``fake`` that records its calls and returns a one-row table."""
    calls = []

    def bench(quick: bool) -> str:
        calls.append(quick)
        return f"| case | quick |\n|---|---|\n| tiny | {quick} |"

    module = types.ModuleType("benchmarks.fake")
    module.run = bench
    monkeypatch.setitem(sys.modules, "benchmarks.fake", module)
    monkeypatch.setattr(run, "available", lambda: ["fake", "other"])
    return calls


def test_prints_only_by_default(fake, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = run.DEFAULT_APPEND.read_text() if run.DEFAULT_APPEND.exists() else None
    assert run.main(["fake", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "## fake (quick)" in out and "| tiny | True |" in out and "appended" not in out
    assert fake == [True]
    assert os.listdir(tmp_path) == []
    after = run.DEFAULT_APPEND.read_text() if run.DEFAULT_APPEND.exists() else None
    assert after == before
    assert run.main(["fake", "--no-append"]) == 0  # the old flag: still print only
    assert fake == [True, False]


def test_append_to_a_path(fake, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "B.md").write_text("# Benchmarks\n")
    assert run.main(["fake", "--append", "B.md"]) == 0
    assert run.main(["fake", "--quick", "--append", str(tmp_path / "B.md")]) == 0
    text = (tmp_path / "B.md").read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count("## fake\n") == 1 and text.count("## fake (quick)") == 1
    assert "| tiny | False |" in text and "| tiny | True |" in text
    assert f"(appended to {tmp_path / 'B.md'})" in capsys.readouterr().out


def test_bare_append_means_the_repository_file(fake, monkeypatch, tmp_path):
    target = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(run, "DEFAULT_APPEND", target)  # not the real file
    monkeypatch.chdir(tmp_path / "..")
    assert run.main(["fake", "--append"]) == 0
    assert target.read_text().startswith("\n## fake\n")


def test_bare_append_default_is_the_repositorys_benchmarks_md():
    assert run.DEFAULT_APPEND == ROOT / "BENCHMARKS.md"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "unknown benchmark 'nope'; choose from fake, other"),
        ([], "name a benchmark (one of fake, other) or pass --list"),
        (["fake", "--append", "no/such/dir/B.md"], "does not exist"),
        (["fake", "--append", "."], "is a directory"),
        (["fake", "--append", "B.md", "--no-append"], "contradict"),
    ],
)
def test_bad_arguments_exit_2_before_running(fake, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert fake == [] and os.listdir(tmp_path) == []


def test_list_and_help_name_the_benchmarks(fake, capsys):
    assert run.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == ["fake", "other"]
    with pytest.raises(SystemExit):
        run.main(["--help"])
    out = capsys.readouterr().out
    assert "benchmarks: fake, other" in out and "--append [PATH]" in out


def test_available_finds_the_real_benchmarks():
    names = run.available()
    assert {"gla", "rnn", "norms", "convbn_modes"} <= set(names)
    assert not {"run", "common", "__init__"} & set(names)
    for name in names:
        assert callable(run.load(name).run), name


@pytest.mark.parametrize("how", ["file", "pythonpath"])
def test_runs_from_any_directory(tmp_path, how):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if how == "file":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--list"]
        env.pop("PYTHONPATH", None)
    else:
        cmd = [sys.executable, "-m", "benchmarks.run", "--list"]
        env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == run.available()
    assert os.listdir(tmp_path) == []


def test_gla_benchmark_gflop_column_uses_the_cost_formula():
    """The fwd+bwd GFLOP figure is the op's formula (forward + backward), which grows with T;
    XLA's cost analysis counted the xla path's loop body once (~0.5 GFLOP at any T)."""
    from benchmarks import gla as bench
    from jaxblocks.kernels.gla.specs import Case

    cases = [Case("t64", 1, 64, 1, 16, 16), Case("t256", 1, 256, 1, 16, 16)]
    impls = {"xla": bench._gla("xla")}
    fwd, bwd = bench._run(cases, impls, warmup=0, iters=1)
    for rows, backward in ((fwd, False), (bwd, True)):
        got = [r.flops for r in rows]
        want = [c.flops() + (c.flops(backward=True) if backward else 0) for c in cases]
        assert got == want
        assert got[1] == 4 * got[0]  # linear in T


@pytest.mark.parametrize("with_batch_stats,two_heads", [(False, False), (True, False),
                                                         (True, True)])  # fmt: skip
def test_vision_step_functions_train_models_with_and_without_collections(with_batch_stats,
                                                                         two_heads):  # fmt: skip
    # A model without non-parameter collections (LayerNorm-only backbones: RaftMLP, MSVMamba)
    # used to come back as a (logits, {}) tuple from apply(mutable=[]); a model with two
    # training heads (UniFormer: (logits, class-token logits)) crashed the loss.
    import flax.linen as nn

    from benchmarks import vision

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(4, (3, 3))(x)
            if with_batch_stats:
                x = nn.BatchNorm(use_running_average=not train)(x)
            logits, other = nn.Dense(3)(x.mean(axis=(1, 2))), nn.Dense(3)(x[:, 0, 0])
            return (logits, other) if two_heads and train else logits

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    infer, train = vision._step_fns(Net(), x)
    assert infer().shape == (2, 3)
    before = jax.tree.map(np.asarray, train())
    after = train()
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    assert any(not np.allclose(a, b) for a, b in pairs)


def _matmul_flops(jaxpr, times: int = 1) -> int:
    """2·M·N·K summed over every dot_general of a jaxpr, scan bodies counted once per step."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = int(np.prod([eqn.invars[0].aval.shape[d] for d in lc]))
            total += times * 2 * k * int(np.prod(eqn.outvars[0].aval.shape))
        n = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None:
                total += _matmul_flops(getattr(inner, "jaxpr", inner), times * n)
    return total


@pytest.mark.parametrize("function", ["lstm", "gru", "elman"])
@pytest.mark.parametrize("backward", [False, True])
def test_rnn_matmuls_alone_do_the_matmul_work_of_the_op(function, backward):
    """The rnn benchmark's "matmuls alone" row multiplies as much as `xla + input projection`
    (its forward, or its forward and backward), so the row is the op's matmul floor."""
    from benchmarks import rnn as bench
    from jaxblocks.kernels.rnn.specs import Case

    case = Case(function, 2, 5, 1, 8, jax.numpy.float32)
    ours, ours_args = bench._xla_with_projection(case, backward)
    alone, alone_args = bench._matmuls_alone(case, backward)
    want = _matmul_flops(jax.make_jaxpr(ours)(*ours_args).jaxpr)
    got = _matmul_flops(jax.make_jaxpr(alone)(*alone_args).jaxpr)
    assert got == want > 0


def test_thunk_profile_names_the_optimized_hlos_instructions():
    """`thunk_profile` reports XLA:CPU's executed instructions by their optimized-HLO names, with
    a loop body's instruction counted once per iteration and a positive time."""
    from benchmarks.common import thunk_profile

    steps, runs = 7, 2

    def fn(h, w):
        def step(h, _):
            return jnp.tanh(jnp.dot(h, w, precision="highest")), None

        return jax.lax.scan(step, h, None, length=steps)[0]

    k1, k2 = jax.random.split(jax.random.key(0))
    args = (jax.random.normal(k1, (8, 32)), jax.random.normal(k2, (32, 32)))
    compiled = jax.jit(fn).lower(*args).compile()
    rows = thunk_profile(compiled, args, runs=runs, warmup=1)
    hlo = compiled.as_text()
    assert rows and all(f"%{name} " in hlo for name, _, _ in rows), rows
    per_step = [r for r in rows if r[1] == steps]  # the body's dot and tanh, once per step
    assert per_step and all(ms > 0 for _, _, ms in per_step), rows
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
