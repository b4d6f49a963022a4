"""TCNCA's sequence mixer by length: the dilated TCN vs an FFT long convolution vs MEGA's EMA.

Terzić et al. (https://arxiv.org/abs/2312.05605) replace MEGA's multi-dimensional damped EMA,
computed as an FFT convolution with its length-L kernel (O(L log L)), by a dilated causal TCN
(O(L)), and report the dilated convolutions up to 7.07× (forward) / 2.86× (backward) faster on
a GPU for lengths up to 131K. This benchmark times, on x [B, L, H], for each length:

* ``tcn``: the depthwise dilated causal `TCN` TCNCA uses (``linear_output=True``; its
  convolutions are `CausalDepthwiseConv`'s shifted multiply-adds), kernel `KERNEL_SIZE`, as
  many levels as needed for a receptive field ≥ L (so it covers what the long convolutions
  cover; the paper's TCN depth per length is not known here);
* ``fft_conv``: the project's long-convolution op (`fft_conv`, ``implementation="xla"``:
  ``jnp.fft``) with a learned per-channel kernel of length L;
* ``ema_fft``: MEGA's EMA as MEGA computes it — the kernel
  ``k_d[t] = Σ_n γ_dn·β_dn·p_dn·(1 − p_dn·δ_dn)^t / √N`` built from its parameters (N =
  `EMA_NDIM`), then the same FFT convolution;
* ``ema_scan``: the same EMA as the recurrence
  ``h_t = p⊙β⊙x_t + (1 − p⊙δ)⊙h_{t−1}``, ``y_t = Σ_n γ h_t / √N`` over an [B, L, H, N] state,
  by ``jax.lax.associative_scan`` (log-depth; the sequential ``lax.scan`` is far slower on a
  GPU).

Forward, and forward + backward (``value_and_grad`` of a sum of squares w.r.t. the
parameters and x). The implementations of a case are timed interleaved (one call of each per
round, the order rotating), medians over rounds. On a CPU only ratios are reported (the
ratio column is "time / tcn": > 1 means slower than the TCN). Quick: up to 4K.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import Measurement, compile_stats
from jaxblocks.blocks.tcn import TCN, tcn_receptive_field
from jaxblocks.kernels.long_conv import fft_conv

# Module constants so a test can shrink the run (see tests/blocks/test_tcn.py).
LENGTHS = (1024, 4096, 16384, 65536, 131072)
QUICK_LENGTHS = (256, 1024, 4096)
BATCH = 1
WIDTH = 64  # channels H
EMA_NDIM = 16  # MEGA's n_dim (its LRA and LM settings)
KERNEL_SIZE = 3
ITERS, QUICK_ITERS, WARMUP = 10, 5, 2
IMPLS = ("tcn", "fft_conv", "ema_fft", "ema_scan")


def tcn_levels_for(length: int, kernel_size: int = KERNEL_SIZE) -> int:
    """Fewest TCN levels whose receptive field covers ``length`` inputs."""
    n = 1
    while tcn_receptive_field(kernel_size, n) < length:
        n += 1
    return n


def _ema_params(key, H: int, N: int):
    """MEGA's MultiHeadEMA initialisation (α, δ ~ N(0, 0.2); β ~ ±1 + N(0, 0.02); γ ~ N(0, 1))."""
    ka, kd, kb, kg = jax.random.split(key, 4)
    sign = jnp.where(jnp.arange(N) % 2 == 0, 1.0, -1.0)
    return {
        "alpha": 0.2 * jax.random.normal(ka, (H, N)),
        "delta": 0.2 * jax.random.normal(kd, (H, N)),
        "beta": sign[None, :] + 0.02 * jax.random.normal(kb, (H, N)),
        "gamma": jax.random.normal(kg, (H, N)),
    }


def _ema_coeffs(p):
    pa = jax.nn.sigmoid(p["alpha"])  # [H, N]
    q = 1.0 - pa * jax.nn.sigmoid(p["delta"])  # damped decay
    return pa * p["beta"], q, p["gamma"] / jnp.sqrt(jnp.float32(p["gamma"].shape[-1]))


def ema_fft(p, x):
    """MEGA's EMA in its FFT form: build the length-L kernel, then one FFT convolution."""
    L = x.shape[1]
    b, q, g = _ema_coeffs(p)
    t = jnp.arange(L, dtype=jnp.float32)
    kern = jnp.einsum(
        "hn,hnl->hl", g * b, jnp.exp(t[None, None, :] * jnp.log(q)[..., None])
    )  # [H, L]
    y = fft_conv(jnp.swapaxes(x, 1, 2), kern, implementation="xla")  # [B, H, L]
    return jnp.swapaxes(y, 1, 2)


def ema_scan(p, x):
    """MEGA's EMA as the linear recurrence, by `jax.lax.associative_scan` over time."""
    b, q, g = _ema_coeffs(p)
    B, L, H = x.shape
    a = jnp.broadcast_to(q, (B, L, *q.shape))  # [B, L, H, N]
    u = x[..., None] * b[None, None]  # [B, L, H, N]

    def combine(left, right):
        a1, u1 = left
        a2, u2 = right
        return a1 * a2, a2 * u1 + u2

    _, h = jax.lax.associative_scan(combine, (a, u), axis=1)
    return jnp.einsum("blhn,hn->blh", h, g)


def long_conv(k, x):
    """A learned length-L kernel per channel through the project's long-conv op (``xla``)."""
    return jnp.swapaxes(fft_conv(jnp.swapaxes(x, 1, 2), k, implementation="xla"), 1, 2)


def _case_fns(L: int):
    """{impl: (f(params, x), params)} for length L, and the input x [B, L, H]."""
    H = WIDTH
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (BATCH, L, H))
    tcn = TCN(H, KERNEL_SIZE, tcn_levels_for(L), depthwise=True, linear_output=True)
    fns = {
        "tcn": (lambda p, x: tcn.apply(p, x), jax.jit(tcn.init)(kp, x[:, :8])),
        "fft_conv": (long_conv, jax.random.normal(kp, (H, L)) / L),
        "ema_fft": (ema_fft, _ema_params(kp, H, EMA_NDIM)),
        "ema_scan": (ema_scan, _ema_params(kp, H, EMA_NDIM)),
    }
    return fns, x


def _fwd_bwd(f):
    def g(p, x):
        return jax.value_and_grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1))(p, x)

    return g


def interleaved(case: str, fns: dict, *, iters: int, warmup: int = WARMUP) -> list[Measurement]:
    """Time ``{impl: (fn, args)}`` interleaved: each round calls every impl once (order rotated).

    Medians over rounds; drifting machine load (a shared CPU, GPU clocks) then hits every
    implementation alike instead of whichever happened to run during it.
    """
    compiled = {}
    for name, (fn, args) in fns.items():
        c, temp, flops = compile_stats(fn, args)
        compiled[name] = (c, args, temp, flops)
        for _ in range(warmup):
            jax.block_until_ready(c(*args))
    names = list(compiled)
    times = {n: [] for n in names}
    for i in range(iters):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            c, args, *_ = compiled[n]
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[n].append(time.perf_counter() - t0)
    return [
        Measurement(case, n, statistics.median(times[n]), compiled[n][2], compiled[n][3])
        for n in names
    ]


def _speedups(rows: list[Measurement], other: str) -> str:
    out = []
    for r in rows:
        if r.impl == other:
            base = next(x for x in rows if x.case == r.case and x.impl == "tcn")
            out.append(f"L={r.case.split('L=')[1].split()[0]}: {r.median_s / base.median_s:.2f}×")
    return ", ".join(out)


def ratio_table(rows: list[Measurement], baseline: str, *, show_time: bool) -> str:
    """Markdown: case × implementation with time and XLA-temp-memory ratios to ``baseline``.

    `benchmarks.common.table` drops the time ratio with the times; on a CPU the ratios are
    what this benchmark reports, so they stay and only the absolute times go.
    """
    head = ["case", "impl"] + (["median time"] if show_time else []) + ["time / " + baseline]
    head += ["XLA temp memory", "memory / " + baseline]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r.case: r for r in rows if r.impl == baseline}
    for r in rows:
        b = base[r.case]
        cells = [r.case, r.impl]
        if show_time:
            t = r.median_s
            cells.append(f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s")
        cells.append(f"{r.median_s / b.median_s:.2f}×")
        mem = "–" if r.temp_bytes is None else f"{r.temp_bytes / 2**20:.1f} MiB"
        mratio = f"{r.temp_bytes / b.temp_bytes:.2f}×" if b.temp_bytes and r.temp_bytes else "–"
        cells += [mem, mratio]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(quick: bool) -> str:
    lengths = QUICK_LENGTHS if quick else LENGTHS
    iters = QUICK_ITERS if quick else ITERS
    fwd, bwd = [], []
    for L in lengths:
        fns, x = _case_fns(L)
        tag = f"B{BATCH} H{WIDTH} L={L} (TCN {tcn_levels_for(L)} levels)"
        fwd += interleaved(f"{tag} fwd", {n: (f, [p, x]) for n, (f, p) in fns.items()}, iters=iters)
        bwd += interleaved(
            f"{tag} fwd+bwd", {n: (_fwd_bwd(f), [p, x]) for n, (f, p) in fns.items()}, iters=iters
        )
    show_time = jax.default_backend() != "cpu"
    note = (
        ""
        if show_time
        else "CPU run: ratios only (absolute times are quoted from a GPU). The paper's GPU "
        "figures: dilated TCN up to 7.07× / 2.86× faster than MEGA's FFT-computed EMA in the "
        "forward / backward pass, lengths up to 131K.\n\n"
    )
    return (
        note + f"x [B={BATCH}, L, H={WIDTH}] fp32. `tcn`: depthwise dilated causal TCN, kernel "
        f"{KERNEL_SIZE}, receptive field ≥ L; `fft_conv`: `fft_conv` (`xla`) with a length-L "
        f"kernel; `ema_fft`: MEGA's EMA (N={EMA_NDIM}) kernel + the same FFT convolution; "
        "`ema_scan`: the EMA recurrence by `lax.associative_scan`. Interleaved medians.\n\n"
        f"EMA (FFT form) / TCN time, forward: {_speedups(fwd, 'ema_fft')}; forward + backward: "
        f"{_speedups(bwd, 'ema_fft')}.\n\n"
        "Forward:\n\n"
        + ratio_table(fwd, "tcn", show_time=show_time)
        + "\n\nForward + backward (`value_and_grad` of a sum of squares w.r.t. parameters and "
        "x):\n\n" + ratio_table(bwd, "tcn", show_time=show_time)
    )
