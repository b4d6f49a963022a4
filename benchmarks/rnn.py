"""flashrnn: tokens/s of every cell and implementation, next to Flax's and cuDNN's LSTM.

Cases (`jaxblocks.kernels.rnn.specs`): B=16, T=512, N=4, D=64 and N=1, D=256 for each cell
(``--quick``: T=64, N=4, D=64). Timed: the recurrence forward (`flashrnn` on precomputed ``Wx``)
and forward+backward (``value_and_grad`` of a sum), per implementation that runs on this
platform: ``reference`` and ``xla`` everywhere, ``pallas_gpu`` on GPU, ``pallas_tpu`` on TPU.
Baselines for the LSTM cases: ``flax.linen.RNN(OptimizedLSTMCell)`` with hidden size N·D (a
full recurrent matrix, so N× the recurrent FLOPs at N=4, and it includes the per-step input
projection) and, on GPU, cuDNN's LSTM (`jax.experimental.rnn.lstm`, also full R). Inputs are
fp32 on CPU and bf16 on accelerators. ``tokens/s`` = B·T / median time.

On CPU with the ``torch`` extra installed, the LSTM, GRU and Elman cases at N = 1 also time
``torch.nn.LSTM`` / ``GRU`` / ``RNN`` (tanh; hidden N·D, full recurrent matrix, input projection
included) beside ``xla + input projection`` (`flashrnn` after the ``x @ W`` projection, the same
work), in alternating rounds: the comparison of issue #13. torch's CPU LSTM runs oneDNN's fused RNN
primitive; a second LSTM row times it with oneDNN off (torch's own composite cell). A third row,
``xla: its matmuls alone``, times only the matmuls of ``xla + input projection`` (the same
shapes and count, `_matmuls_alone`): what is left once XLA:CPU's matmuls are paid for.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import Measurement, compile_stats, interleaved_medians, measure, table
from jaxblocks.kernels.rnn.api import CELLS, IMPLEMENTATIONS, flashrnn
from jaxblocks.kernels.rnn.specs import (
    BENCHMARK_CASES,
    QUICK_BENCHMARK_CASES,
    Case,
    flops,
    make_inputs,
)


def _impls() -> list[str]:
    platform = jax.default_backend()
    extra = {"gpu": ["pallas_gpu"], "cuda": ["pallas_gpu"], "tpu": ["pallas_tpu"]}
    return ["reference", "xla"] + extra.get(platform, [])


def _ours(case: Case, implementation: str, backward: bool):
    def fwd(wx, r, b, s):
        return flashrnn(wx, r, b, s, function=case.function, implementation=implementation)

    if not backward:
        return fwd

    def loss(wx, r, b, s):
        sa, last = fwd(wx, r, b, s)
        return jnp.sum(sa.astype(jnp.float32)) + jnp.sum(last.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def _flax_lstm(case: Case, backward: bool):
    H = case.N * case.D
    rnn = nn.RNN(nn.OptimizedLSTMCell(features=H, dtype=case.dtype))
    x = jnp.ones((case.B, case.T, H), case.dtype)
    params = rnn.init(jax.random.key(0), x)

    def fwd(params, x):
        return rnn.apply(params, x)

    if not backward:
        return fwd, (params, x)

    def loss(params, x):
        return jnp.sum(fwd(params, x).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1)), (params, x)


def _cudnn_lstm(case: Case, backward: bool):
    from jax.experimental import rnn as jrnn

    H = case.N * case.D
    w = jrnn.init_lstm_weight(jax.random.key(0), H, H, 1, False).astype(case.dtype)
    x = jnp.ones((case.B, case.T, H), case.dtype)
    h0 = jnp.zeros((1, case.B, H), case.dtype)
    lengths = jnp.full((case.B,), case.T, jnp.int32)

    def fwd(x, h0, w):
        return jrnn.lstm(x, h0, h0, w, lengths, H, H, 1, 0.0, False)[0]

    if not backward:
        return fwd, (x, h0, w)

    def loss(x, h0, w):
        return jnp.sum(fwd(x, h0, w).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, h0, w)


def _xla_with_projection(case: Case, backward: bool):
    """x [B, T, H] @ W [H, G·N·D] then `flashrnn` (xla): what torch.nn's cells compute."""
    cell = CELLS[case.function]
    H = case.N * case.D
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (case.B, case.T, H), case.dtype)
    w = (jax.random.normal(k[1], (H, cell.G * H)) / H**0.5).astype(case.dtype)
    _, r, b, s = make_inputs(case)

    def fwd(x, w, r, b, s):
        wx = (x @ w).reshape(case.B, case.T, cell.G, case.N, case.D)
        return flashrnn(wx, r, b, s, function=case.function, implementation="xla")

    if not backward:
        return fwd, (x, w, r, b, s)

    def loss(*a):
        sa, last = fwd(*a)
        return jnp.sum(sa.astype(jnp.float32)) + jnp.sum(last.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), (x, w, r, b, s)


def _matmuls_alone(case: Case, backward: bool):
    """The matmuls of ``xla + input projection`` alone, at the same shapes and count: the floor
    that XLA:CPU's matmul throughput puts under it (`_side_by_side`'s "xla: its matmuls alone").

    Forward: the projection ``[B·T, H] × [H, G·H]`` and T dependent recurrent products
    ``[B, H] × [H, Gr·H]``. Forward+backward adds ``dx``, ``dW`` and ``dR`` (three more
    ``B·T``-row matmuls) and T dependent ``[B, Gr·H] × [Gr·H, H]`` products. A ``tanh`` of each
    product (``[B, Gr·H]`` or ``[B, H]`` elements) carries the dependence between steps.
    """
    cell = CELLS[case.function]
    H, BT = case.N * case.D, case.B * case.T
    hi = jax.lax.Precision.HIGHEST
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (BT, H), case.dtype)
    w = (jax.random.normal(k[1], (H, cell.G * H)) / H**0.5).astype(case.dtype)
    r = (jax.random.normal(k[2], (H, cell.Gr * H)) / H**0.5).astype(case.dtype)
    g_in = jax.random.normal(k[3], (BT, cell.G * H), case.dtype)
    g_rec = jax.random.normal(k[4], (BT, cell.Gr * H), case.dtype)

    def fwd_steps(h0, r):
        def step(h, _):
            return jnp.tanh(jnp.dot(h, r, precision=hi))[:, :H], None

        return jax.lax.scan(step, h0, None, length=case.T)[0]

    def bwd_steps(d0, r_t):
        def step(d, _):
            return jnp.tile(jnp.tanh(jnp.dot(d, r_t, precision=hi)), (1, cell.Gr)), None

        return jax.lax.scan(step, d0, None, length=case.T)[0]

    def fn(x, w, r, g_in, g_rec):
        out = (jnp.dot(x, w, precision=hi), fwd_steps(x[: case.B], r))
        if not backward:
            return out
        dx = jnp.dot(g_in, w.T, precision=hi)
        dw = jnp.dot(x.T, g_in, precision=hi)
        dr = jnp.dot(x.T, g_rec, precision=hi)
        return out + (dx, dw, dr, bwd_steps(g_rec[: case.B], r.T))

    return fn, (x, w, r, g_in, g_rec)


TORCH_CELLS = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN"}  # torch.nn.RNN: tanh, as elman


def _torch_step(case: Case, backward: bool, onednn: bool = True):
    """One blocking call of torch.nn.LSTM / GRU / RNN(tanh) on CPU (fp32); None without torch.

    ``onednn=False`` turns off torch's oneDNN (mkldnn) backend, whose fused RNN primitive runs
    torch's CPU LSTM: what torch's own composite cell costs.
    """
    try:
        import torch
    except ImportError:
        return None
    H = case.N * case.D
    mod = getattr(torch.nn, TORCH_CELLS[case.function])(H, H, batch_first=True)
    x = torch.randn(case.B, case.T, H, requires_grad=backward)

    def run():
        if backward:
            mod.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = mod(x)
            out.sum().backward()
        else:
            with torch.no_grad():
                mod(x)

    def step():
        with torch.backends.mkldnn.flags(enabled=onednn):
            run()

    return step


def _side_by_side(case: Case, backward: bool, iters: int, warmup: int) -> list[Measurement]:
    """``xla + input projection`` and torch.nn's cell, timed in alternating rounds
    (`interleaved_medians`): both see the same machine state, which drifts on a shared VM."""
    torch_name = f"torch.nn.{TORCH_CELLS[case.function]}, full R + input projection"
    steps = {torch_name: _torch_step(case, backward)}
    if steps[torch_name] is None:
        return []
    if case.function == "lstm":  # torch's CPU LSTM is oneDNN's fused RNN; also time without it
        steps[torch_name + ", oneDNN off"] = _torch_step(case, backward, onednn=False)
    fn, fargs = _xla_with_projection(case, backward)
    compiled, temp, _ = compile_stats(fn, fargs)
    ours = "xla + input projection"
    mfn, margs = _matmuls_alone(case, backward)
    mm_compiled = jax.jit(mfn).lower(*margs).compile()
    floor = "xla: its matmuls alone (same shapes and count)"
    steps = {ours: lambda: compiled(*fargs), floor: lambda: mm_compiled(*margs), **steps}
    medians = interleaved_medians(steps, iters, warmup=warmup)
    return [
        Measurement(case.name, name, t, temp if name == ours else None)
        for name, t in medians.items()
    ]


def _with_tokens(m: Measurement, case: Case) -> Measurement:
    m.extra["tokens/s"] = f"{case.tokens / m.median_s:,.0f}"
    return m


def run(quick: bool = False) -> str:
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    cases = [
        dataclasses.replace(c, dtype=dtype)
        for c in (QUICK_BENCHMARK_CASES if quick else BENCHMARK_CASES)
    ]
    iters, warmup = (3, 1) if quick else (10, 2)
    sections, skipped = [], []
    for backward in (False, True):
        rows = []
        for case in cases:
            args = make_inputs(case)
            label = case.name
            for impl in _impls():
                reason = IMPLEMENTATIONS[impl].reason_unsupported(*args, case.function)
                if reason is not None:  # e.g. pallas_gpu beyond its head-dim limit
                    if not backward:
                        skipped.append(f"{label} {impl}: {reason}")
                    continue
                m = measure(
                    label,
                    impl,
                    _ours(case, impl, backward),
                    args,
                    iters=iters,
                    warmup=warmup,
                    flops=flops(case, backward),
                )
                rows.append(_with_tokens(m, case))
            if on_cpu and case.function in TORCH_CELLS and case.N == 1:
                rows += [
                    _with_tokens(m, case) for m in _side_by_side(case, backward, iters, warmup)
                ]
            if case.function == "lstm":
                fn, fargs = _flax_lstm(case, backward)
                m = measure(
                    label,
                    "flax RNN(OptimizedLSTMCell), full R",
                    fn,
                    fargs,
                    iters=iters,
                    warmup=warmup,
                )
                rows.append(_with_tokens(m, case))
                if not on_cpu and jax.default_backend() in ("gpu", "cuda"):
                    fn, fargs = _cudnn_lstm(case, backward)
                    m = measure(label, "cuDNN LSTM, full R", fn, fargs, iters=iters, warmup=warmup)
                    rows.append(_with_tokens(m, case))
        title = "forward + backward" if backward else "forward"
        sections.append(f"### {title}\n\n" + table(rows, baseline="reference"))
    note = (
        "GFLOP column: the kernels' cost formula (`specs.flops`) for flashrnn rows, XLA's count "
        "for Flax/cuDNN rows. Flax/cuDNN use a full (N·D)² recurrent matrix and include the "
        "input projection; flashrnn rows time the head-wise recurrence on precomputed Wx."
    )
    if skipped:
        note += "\n\nNot run (the implementation's `supports` rejects the case):\n" + "\n".join(
            f"- {s}" for s in skipped
        )
    return "\n\n".join(sections) + "\n\n" + note
