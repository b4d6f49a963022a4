"""Minimal script for the XLA:CPU FFT hang seen once in a side-by-side benchmark (issue #12).

``fft_conv``'s xla path is jnp.fft.rfft -> multiply -> irfft (forward) and the same transposed
(backward). Reported: at B2 H256 L4096, forward+backward gave no answer for 300 s, twice, with
both XLA:CPU intra-op threads waiting in the FFT library's latch under XLA's FFT thunk. This
script runs the same computation in plain JAX (no jaxblocks) many times and prints one line per
call, so a hang shows as a stall; run it under ``timeout``:

    timeout 120 python tools/xla_cpu_fft_hang_repro.py --batch 2 --heads 256 --calls 200

``--no-multi-thread-eigen`` sets ``--xla_cpu_multi_thread_eigen=false`` (the reported workaround).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=256)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--no-multi-thread-eigen", action="store_true")
    p.add_argument(
        "--stacked",
        action="store_true",
        help="jaxblocks' workaround: one rfft over the input and kernel rows together",
    )
    args = p.parse_args(argv)
    if args.no_multi_thread_eigen:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        )
    import jax
    import jax.numpy as jnp

    b, h, length = args.batch, args.heads, args.length
    n = 2 * length

    def conv(u, k):  # causal long convolution by FFT: two independent rffts, as autodiff sees it
        y = jnp.fft.irfft(jnp.fft.rfft(u, n) * jnp.fft.rfft(k, n), n)[..., :length]
        return jnp.sum(y * y)

    def conv_stacked(u, k):  # one rfft for both, so no two FFT thunks can run at once
        rows = jnp.concatenate([u.reshape(b * h, length), k], axis=0)
        f = jnp.fft.rfft(rows, n)
        y = jnp.fft.irfft(f[: b * h].reshape(b, h, -1) * f[b * h :], n)[..., :length]
        return jnp.sum(y * y)

    step = jax.jit(jax.value_and_grad(conv_stacked if args.stacked else conv, argnums=(0, 1)))
    u = jax.random.normal(jax.random.key(0), (b, h, length))
    k = jax.random.normal(jax.random.key(1), (h, length)) / length
    t0 = time.perf_counter()
    for i in range(args.calls):
        t = time.perf_counter()
        jax.block_until_ready(step(u, k))
        print(f"call {i}: {time.perf_counter() - t:.3f} s", flush=True)
    print(f"done: {args.calls} calls in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
