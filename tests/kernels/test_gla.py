"""chunk_gla / fused_recurrent_gla: every implementation against the fp32 token-loop reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import UnsupportedImplementationError, interpret, resources
from jaxblocks.kernels.gla import BlockSizes, _common, chunk_gla, fused_recurrent_gla, specs
from jaxblocks.kernels.gla import xla as xla_gla
from jaxblocks.kernels.gla.reference import gla_reference
from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
)

# bf16 tolerance: operands are rounded to 8-bit mantissas (2^-9 relative) before every matmul
# (rescaled q/k, A, the states) and the output is stored in bf16, so errors of a few 1e-3 add up
# over the K/V contractions; fla accepts bf16 at the same metric with ratio 1e-2..2e-2. The
# reference runs on the same bf16-rounded inputs promoted to fp32.
BF16_TOL = 2e-2
# fp32 tolerances of the Pallas kernels in the interpreters, about 10x the largest relative RMS
# error measured over these tests' cases (forward and every gradient, both backends): 1.7e-6
# (dg; o, dq, dk, dv, dh0 <= 6.3e-7) at ordinary gates with and without segments; 2.6e-5 (dg;
# o 1.4e-5) with -1e4 resets among ordinary gates, whose chunk cumsums carry 2^-24 |G| per step.
PALLAS_FP32_TOL = 2e-5
PALLAS_FP32_RESET_TOL = 3e-4


def _op(impl, *, chunk_size=64, **kw):
    @jax.jit  # one compiled program per check (the interpreters run much faster jitted)
    def fn(q, k, v, g, h0):
        return chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            chunk_size=chunk_size,
            implementation=impl,
            **kw,
        )

    return fn


REF = _op("reference")


def _np_gla(q, k, v, g, scale, h0=None):
    """An independent float64 numpy token loop (no compilation per length)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    B, T, H, K = q.shape
    S = np.zeros((B, H, K, v.shape[-1])) if h0 is None else np.asarray(h0, np.float64).copy()
    o = np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
        S = np.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


# ---------------------------------------------------------------------------------------------
# xla against the reference: the shape sweep, gate strengths, bf16.


_CI_CASES = ("t63_k60_v100",)


@pytest.mark.parametrize(
    "case",
    [
        c if c.name in _CI_CASES else pytest.param(c, marks=pytest.mark.slow)
        for c in specs.TEST_CASES
    ],
    ids=lambda c: c.name,
)
def test_xla_matches_reference(case):
    check_forward_and_vjp(_op("xla"), REF, case.make())


def test_xla_forward_long_sequences():
    # The T = 1000 cases of the sweep, forward only (the VJP runs in the slow sweep above).
    xla = _op("xla")
    for case in specs.TEST_CASES[-2:]:
        args = case.make()
        assert_close(xla(*args), REF(*args), name=case.name)


def test_xla_gate_strengths():
    xla = _op("xla")
    for case in specs.GATE_TEST_CASES:  # one shape: compiled once, run for n = 0.1, 1, 10
        check_forward_and_vjp(xla, REF, case.make(1))


@pytest.mark.slow
def test_xla_bf16():
    q, k, v, g, h0 = specs.Case("bf16", 2, 100, 2, 64, 64, "bfloat16").make(2)
    check_forward_and_vjp(_op("xla"), REF, [q, k, v, g, h0], dtype=jnp.bfloat16, tol=BF16_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_xla_other_chunk_sizes(chunk_size):
    args = specs.Case("cs", 1, 150, 2, 24, 40).make(3)
    check_forward_and_vjp(_op("xla", chunk_size=chunk_size), REF, args)


@pytest.mark.slow
def test_xla_custom_chunking_matches_autodiff_of_reference():
    check_custom_vjp_matches_autodiff(_op("xla"), REF, specs.Case("a", 1, 70, 2, 16, 16).make(4))


def _all_grads_finite(fn, args):
    out, vjp = jax.vjp(fn, *args)
    grads = vjp(jax.tree.map(jnp.ones_like, out))
    for x in jax.tree.leaves((out, grads)):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))


def test_xla_extreme_gates_stay_finite():
    q, k, v, g, h0 = specs.Case("x", 2, 90, 2, 16, 24).make(5)
    # Gates near -1e4, and a mix of -1e4 and tiny gates (the state is wiped, then rebuilt).
    g1 = jnp.full_like(g, -1e4) + g
    g2 = jnp.where(jax.random.bernoulli(jax.random.key(9), 0.3, g.shape), -1e4, g * 1e-3)
    xla = _op("xla")
    for gg in (g1, g2):
        _all_grads_finite(xla, (q, k, v, gg, h0))
        assert_close(xla(q, k, v, gg, h0), REF(q, k, v, gg, h0), tol=5e-3)


def _xla_branches(g, W, C=64, c=16):
    """The intra-chunk form `_gla_loop` picks for each step (0 chunk-factored, 1 sub-chunk-
    factored, 2 sub-chunked), recomputed in float64 numpy from the gates."""
    B, T, H, K = g.shape
    steps = -(-T // W)
    gp = np.pad(np.asarray(g, np.float64), ((0, 0), (0, steps * W - T), (0, 0), (0, 0)))
    G = np.cumsum(gp.reshape(B, steps, W // C, C, H, K), axis=3)
    Gs = G.reshape(B, steps, W // C, C // c, c, H, K)
    chunk = np.abs(G).max(axis=(0, 2, 3, 4, 5))
    within = np.abs(Gs - Gs[:, :, :, :, :1]).max(axis=(0, 2, 3, 4, 5, 6))
    bound = xla_gla.FACTOR_BOUND
    forms = [
        0 if a <= bound else 1 if b <= bound else 2 for a, b in zip(chunk, within, strict=True)
    ]
    return forms, chunk


def test_xla_mixes_its_three_intra_chunk_forms():
    # The xla forward picks, per step of GROUP chunks, the chunk-factored, the sub-chunk-factored
    # or the sub-chunked form of the intra-chunk scores (see `_gla_loop`). T = 1600 gives four
    # steps (the last one padded): mild gates; a strong stretch (G falls by 3 per token) in the
    # second step; in the third a channel whose chunk cumsum ends just under the bound, with large
    # q and k (the factored operands then span e^{±40}); in the fourth a chunk falling by 1 per
    # token (|G| = 64 over the chunk, 15 inside a sub-chunk).
    B, T, H, K, V = 2, 1600, 2, 16, 24
    q, k, v, g, h0 = specs.Case("mix", B, T, H, K, V).make(21)
    g = g / 50.0  # mild: |G| ≤ 64 / 50 · max|g|
    g = g.at[:, 700:760].set(-3.0)
    W = xla_gla.GROUP * 64
    t0 = 2 * W  # the first (whole) chunk of the third step
    g = g.at[:, t0 : t0 + 64, :, 0].set(-(xla_gla.FACTOR_BOUND - 0.5) / 64)
    g = g.at[:, 3 * W : 3 * W + 64].set(-1.0)
    branches, chunk_max = _xla_branches(g, W)
    assert branches == [0, 2, 0, 1]  # the premise: every form is taken
    assert xla_gla.FACTOR_BOUND - 1 < chunk_max[2]  # step 2 sits just under the bound
    # Gradients through every form (the steps are rematerialised in the backward).
    check_forward_and_vjp(_op("xla"), REF, [q, k, v, g, h0])
    q, k = q.at[:, t0 : t0 + 64].multiply(1e3), k.at[:, t0 : t0 + 64].multiply(1e3)
    o, final = _op("xla")(q, k, v, g, h0)
    o64, final64 = _np_gla(q, k, v, g, K**-0.5, h0)
    for s in range(4):  # per step (the 1e3-scaled chunk would dominate a global RMS)
        assert_close(o[:, s * W : (s + 1) * W], o64[:, s * W : (s + 1) * W], name=f"o step {s}")
    assert_close(final, final64, name="final_state")
    assert_close((o, final), REF(q, k, v, g, h0))


def test_xla_forward_mode_matches_reference():
    # The xla path is plain JAX autodiff (no custom_vjp), so jvp works; in each intra-chunk form.
    q, k, v, g, h0 = specs.Case("jvp", 2, 70, 2, 16, 24).make(22)
    tangents = [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate((q, k, v, g))]
    tangents.append(jax.random.normal(jax.random.key(9), h0.shape))

    def op(impl):
        def f(q, k, v, g, h0):
            return chunk_gla(
                q, k, v, g, initial_state=h0, output_final_state=True, implementation=impl
            )

        return jax.jit(lambda p, t: jax.jvp(f, p, t))

    xla, ref = op("xla"), op("reference")
    for gg, form in ((g / 16, 0), (g, 1), (jnp.minimum(g, -3.0), 2)):
        assert _xla_branches(gg, 64 * xla_gla.GROUP)[0] == [form]
        primals = (q, k, v, gg, h0)
        assert_close(xla(primals, tuple(tangents)), ref(primals, tuple(tangents)))


# ---------------------------------------------------------------------------------------------
# Pallas kernels under the interpreters (small, odd shapes).


def _segment_ids(lens):
    return jnp.asarray(np.stack([np.repeat(np.arange(len(r)), r) for r in lens]).astype(np.int32))


def test_pallas_gpu_interpret_fp32():
    with interpret():
        check_forward_and_vjp(
            _op("pallas_gpu"), REF, specs.INTERPRET_TEST_CASES[0].make(6), tol=PALLAS_FP32_TOL
        )


def test_pallas_gpu_interpret_several_value_blocks():
    # V = 100 pads to 128 > the default block_v = 64: two value blocks in every GPU kernel, the
    # gradient kernel's dq, dk and dG_L summed over them.
    case = specs.Case("nv", 1, 40, 2, 16, 100)
    op = _op("pallas_gpu", chunk_size=16)
    with interpret():
        check_forward_and_vjp(op, REF, case.make(40), tol=PALLAS_FP32_TOL)
        jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(op(*a)[0]), argnums=3))(*case.make(40))
    assert _pallas_calls(jaxpr.jaxpr)["gla_grads_gpu"]["grid_mapping"].grid == (1, 2, 3, 2)


@pytest.mark.parametrize(
    ("case", "chunk_size", "Kp", "grid"),
    [
        (specs.Case("nv", 1, 40, 2, 16, 100), 16, 16, (1, 2, 3, 2)),  # 3 chunks, 2 value blocks
        (specs.Case("b2", 2, 130, 3, 20, 64), 64, 32, (2, 3, 3, 1)),  # K padded, chunk partial
    ],
    ids=["t40_c16_v100", "t130_c64_v64"],
)
def test_pallas_gpu_forward_is_parallel_over_chunks(case, chunk_size, Kp, grid):
    # The GPU forward is fla's split: the sequential states pass over (B, H, NV), then the output
    # kernel with one program per (B, H, chunk, value block), reading the state entering its
    # chunk. No other kernel runs in the forward (the old serial forward kernel is gone).
    args = case.make(44)
    seg = _segment_ids([[7, case.T - 7]] * case.B)
    for kw in ({}, {"segment_ids": seg}):
        with interpret():
            jaxpr = jax.make_jaxpr(_op("pallas_gpu", chunk_size=chunk_size, **kw))(*args)
        calls = _pallas_calls(jaxpr.jaxpr)
        assert set(calls) == {"gla_states_gpu", "gla_fwd_o_gpu"}
        B, H, NT, NV = grid
        assert tuple(calls["gla_fwd_o_gpu"]["grid_mapping"].grid) == grid
        assert tuple(calls["gla_states_gpu"]["grid_mapping"].grid) == (B, H, NV)
        # Each program reads one [C, Kp] chunk of q and the [Kp, BV] state entering that chunk.
        rows = lambda bm: (bm.block_shape[2].block_size, bm.array_aval.shape[2])
        mappings = calls["gla_fwd_o_gpu"]["grid_mapping"].block_mappings
        assert rows(mappings[0]) == (chunk_size, NT * chunk_size)  # q
        assert rows(mappings[4]) == (Kp, (NT + 1) * Kp)  # h: the states pass's output


@pytest.mark.parametrize(
    "impl", ["pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)]
)  # the stage split is backend-generic; the GPU benchmark uses it
def test_stages_compose_to_the_op_and_its_vjp(impl):
    # The separate calls the GPU benchmark times one by one (`benchmarks/gla.py`) are the op's
    # own: run in order, they give the op's output and gradients (two chunks, K and V padded).
    from benchmarks import gla as bench
    from jaxblocks.kernels.gla.api import IMPLEMENTATIONS

    case = specs.Case("st", 1, 27, 1, 12, 20)
    q, k, v, g, _ = case.make(41, initial_state=False)
    do = jax.random.normal(jax.random.key(3), v.shape)
    scale = 12**-0.5
    with interpret():
        stages = IMPLEMENTATIONS[impl].fn.stages(q, k, v, g, do, scale=scale, chunk_size=16)
        rows, out = bench._stage_rows(stages, case.name, warmup=0, iters=1)
    names = ["prepare (XLA)", "forward", "states (backward)", "dstates", "grads", "assemble (XLA)"]
    assert [r.impl for r in rows] == [*names, "sum of the stages"]
    assert all(r.median_s > 0 for r in rows)
    assert rows[-1].median_s == pytest.approx(sum(r.median_s for r in rows[:-1]))
    assert "| grads |" in bench._stage_table(rows)
    xla_op = lambda q, k, v: chunk_gla(q, k, v, g, scale=scale, implementation="xla")[0]
    o, vjp = jax.vjp(xla_op, q, k, v)
    want = vjp(do)
    unpad = lambda x, D: jnp.swapaxes(x, 1, 2)[:, : case.T, :, :D]  # [B, H, Tp, Dp] -> [B, T, H, D]
    assert_close(unpad(out["forward"][0], case.V), o, tol=PALLAS_FP32_TOL, name="o")
    dq, dk, dv = out["assemble (XLA)"][:3]
    for got, w, D, name in ((dq, want[0], case.K, "dq"), (dk, want[1], case.K, "dk"),
                            (dv, want[2], case.V, "dv")):  # fmt: skip
        assert_close(unpad(got, D), w, tol=PALLAS_FP32_TOL, name=name)


def test_pallas_tpu_interpret_fp32_segments():
    # A length-1 segment, a segment crossing the chunk boundary, a final one-token segment.
    seg = _segment_ids([[3, 1, 50, 8, 1]])
    ref = _op("reference", segment_ids=seg)
    with interpret():
        check_forward_and_vjp(
            _op("pallas_tpu", segment_ids=seg),
            ref,
            specs.INTERPRET_TEST_CASES[1].make(6),
            tol=PALLAS_FP32_TOL,
        )


def test_pallas_gpu_interpret_bf16_strong_gates_segments():
    q, k, v, g, h0 = specs.Case("b", 1, 40, 2, 32, 32, "bfloat16", gate_normalizer=0.1).make(7)
    seg = _segment_ids([[1, 20, 18, 1]])
    with interpret():
        check_forward_and_vjp(
            _op("pallas_gpu", chunk_size=32, segment_ids=seg),
            _op("reference", segment_ids=seg),
            [q, k, v, g, h0],
            dtype=jnp.bfloat16,
            tol=BF16_TOL,
        )


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_interpret_extreme_gates_and_custom_vjp(impl):
    q, k, v, g, h0 = specs.Case("e", 1, 20, 2, 16, 16).make(8)
    resets = jnp.where(jax.random.bernoulli(jax.random.key(3), 0.3, g.shape), -1e4, g)
    with interpret():
        # (assert_close inside also requires every output and gradient to be finite.)
        # Resets of -1e4 among ordinary gates, then every gate near -1e4.
        check_custom_vjp_matches_autodiff(
            _op(impl, chunk_size=16), REF, [q, k, v, resets, h0], tol=PALLAS_FP32_RESET_TOL
        )
        check_forward_and_vjp(
            _op(impl, chunk_size=16), REF, [q, k, v, g - 1e4, h0], tol=PALLAS_FP32_RESET_TOL
        )


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_interpret_larger_shapes_and_cu_seqlens(impl):
    # Three chunks, K=100 / V=64 (padded inside), strong gates, then packed sequences.
    case = specs.Case("mid", 2, 130, 2, 100, 64, gate_normalizer=0.1)
    with interpret():
        check_forward_and_vjp(_op(impl), REF, case.make(20))
        cu = jnp.asarray([0, 1, 40, 41, 100], jnp.int32)
        q, k, v, g, _ = specs.Case("cu", 1, 100, 2, 16, 32).make(21, initial_state=False)
        h0 = jax.random.normal(jax.random.key(22), (4, 2, 16, 32))
        run = lambda name: jax.jit(
            lambda q, k, v, g, h0: chunk_gla(
                q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                implementation=name,
            )
        )  # fmt: skip
        check_forward_and_vjp(run(impl), run("reference"), [q, k, v, g, h0])


@pytest.mark.parametrize(("impl", "platform"), [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
@pytest.mark.parametrize("T", [2048, 1000])
def test_pallas_lowering(impl, platform, T):
    # T=1000 also exercises the K/V padding and the segment_ids path.
    c = specs.LOWERING_CASES[0]
    K = c.K if T == 2048 else 100
    seg = None if T == 2048 else (jnp.arange(T) // 300)[None].astype(jnp.int32)
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    args = [
        sd(c.B, T, c.H, K),
        sd(c.B, T, c.H, K),
        sd(c.B, T, c.H, K),
        sd(c.B, T, c.H, K, dt=jnp.float32),
        sd(c.B, c.H, K, K, dt=jnp.float32),
    ]

    def loss(q, k, v, g, h0):
        o, s = _op(impl, segment_ids=seg)(q, k, v, g, h0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    text = check_pallas_lowering(loss, args, platform, op=f"chunk_gla[{impl}]", min_kernels=4)
    suffix = "gpu" if impl == "pallas_gpu" else "tpu"
    for name in _common.KERNELS[impl]:
        assert f"gla_{name}_{suffix}" in text
    if impl == "pallas_gpu":  # the serial forward kernel is gone: states + chunk-parallel fwd_o
        assert "gla_fwd_gpu" not in text


# ---------------------------------------------------------------------------------------------
# block_sizes through the public function, its validation, supports, the cost model.


def _pallas_calls(jaxpr) -> dict[str, dict]:
    """{kernel name: pallas_call params} of every pallas_call in ``jaxpr`` and its sub-jaxprs."""
    calls = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            calls[eqn.params["name"]] = eqn.params
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    calls.update(_pallas_calls(sub))
    return calls


# Non-default block sizes, the inputs and the grids they give. GPU: V=60 -> Vp=64 in 4 value
# blocks of 16 (default: 1 of 64), one sub-chunk of 32 per chunk (default: two of 16), 2 warps;
# chunk_size=32 over T=40 -> 2 chunks. TPU: V=130 -> Vp=256 in 1 value block of 256 (default:
# 2 of 128), sub-chunks of 8 (default 16); chunk_size=16 over T=40 -> 3 chunks; with segments.
PUBLIC_BLOCKS = {
    "pallas_gpu": (
        BlockSizes(sub_chunk=32, block_v=16, num_warps=2),
        specs.Case("pub_gpu", 1, 40, 2, 32, 60, gate_normalizer=0.5),
        32,
        None,
        {
            "gla_fwd_o_gpu": (1, 2, 2, 4),
            "gla_states_gpu": (1, 2, 4),
            "gla_dstates_gpu": (1, 2, 4),
            "gla_grads_gpu": (1, 2, 2, 4),
        },
    ),
    "pallas_tpu": (
        BlockSizes(sub_chunk=8, block_v=256),
        specs.Case("pub_tpu", 1, 40, 2, 20, 130),
        16,
        [[7, 20, 13]],
        {
            "gla_fwd_tpu": (1, 2, 1, 3),
            "gla_states_tpu": (1, 2, 1, 3),
            "gla_dstates_tpu": (1, 2, 1, 3),
            "gla_grads_tpu": (1, 2, 3, 1),
        },
    ),
}


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_block_sizes_pass_through_public_function(impl):
    blocks, case, chunk_size, lens, want_grids = PUBLIC_BLOCKS[impl]
    seg = None if lens is None else _segment_ids(lens)
    args = case.make(23)
    op = _op(impl, chunk_size=chunk_size, segment_ids=seg, block_sizes=blocks)
    with interpret():
        check_forward_and_vjp(op, _op("reference", segment_ids=seg), args)

        def loss(*a):
            o, s = op(*a)
            return jnp.sum(o) + jnp.sum(s)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args).jaxpr
    calls = _pallas_calls(jaxpr)
    assert {name: tuple(p["grid_mapping"].grid) for name, p in calls.items()} == want_grids
    if impl == "pallas_gpu":
        assert all(p["compiler_params"].num_warps == 2 for p in calls.values())


def test_kernel_cost_estimates_use_the_common_formulas():
    # The forward's pl.CostEstimate (on the GPU carried by the output kernel, the states pass
    # included) is the cost model at the padded shapes, and specs' FLOPs are the same formula
    # at chunk 64.
    blocks, case, chunk_size, _, _ = PUBLIC_BLOCKS["pallas_gpu"]
    args = case.make(24)
    with interpret():
        jaxpr = jax.make_jaxpr(_op("pallas_gpu", chunk_size=chunk_size, block_sizes=blocks))(*args)
    cost = _pallas_calls(jaxpr.jaxpr)["gla_fwd_o_gpu"]["cost_estimate"]
    B, Tp, H, Kp, Vp = case.B, 64, case.H, 32, 64
    assert cost.flops == _common.flops(B, Tp, H, Kp, Vp, chunk=32)
    assert cost.transcendentals == _common.transcendentals(B, Tp, H, Kp)
    assert cost.bytes_accessed == _common.bytes_accessed(B, Tp, H, Kp, Vp, chunk=32, itemsize=4)
    assert cost.flops == B * H * Tp * (32 * Kp + 32 * Vp + 4 * Kp * Vp)
    c = specs.BENCHMARK_CASES[0]
    assert c.flops() == c.B * c.H * c.T * (64 * c.K + 64 * c.V + 4 * c.K * c.V)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sub_chunk", 12),
        ("sub_chunk", 4),
        ("sub_chunk", 256),
        ("sub_chunk", True),
        ("block_v", 8),
        ("block_v", 24),
        ("block_v", 16.0),
        ("num_warps", 0),
        ("num_warps", 3),
    ],
)
def test_block_sizes_field_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"BlockSizes\.{field} must be .*got {value!r}"):
        BlockSizes(**{field: value})


def test_block_sizes_of_the_wrong_type_raise_type_error():
    q, k, v, g, _ = specs.Case("bs", 1, 8, 2, 16, 8).make(25)
    with pytest.raises(TypeError, match="block_sizes must be None or a .*BlockSizes, got str"):
        chunk_gla(q, k, v, g, block_sizes="x")
    with pytest.raises(TypeError, match="block_sizes .* got dict"):
        chunk_gla(q, k, v, g, block_sizes={"block_v": 16}, implementation="xla")


@pytest.mark.parametrize(
    ("impl", "blocks", "shape", "match"),
    [
        ("pallas_gpu", BlockSizes(sub_chunk=8), (1, 8, 2, 16), "sub_chunk must be >= 16"),
        ("pallas_tpu", BlockSizes(block_v=64), (1, 8, 2, 16), "block_v must be a multiple of 128"),
        ("pallas_gpu", None, (1, 4, 1, 300), "head dims K=300, V=300 exceed 256"),
        (
            "pallas_gpu",
            BlockSizes(block_v=256, num_warps=4),
            (1, 4, 1, 256),
            r"gla_fwd_o_gpu: ~\d+ registers per thread at num_warps=4 exceed the 255",
        ),
    ],
)
def test_unsupported_inputs_name_the_reason(impl, blocks, shape, match):
    x = jax.random.normal(jax.random.key(26), shape)
    with pytest.raises(UnsupportedImplementationError, match=f"{impl}.*{match}"):
        chunk_gla(x, x, x, -jnp.abs(x), implementation=impl, block_sizes=blocks)
    # Each backend's rule is its own: the other backend takes these block sizes.
    other = "pallas_tpu" if impl == "pallas_gpu" else "pallas_gpu"
    if blocks is not None and x.shape[-1] < 256:
        kw = dict(scale=1.0, initial_state=None, segment_ids=None, chunk_size=64)
        assert _common.supports(other, x, x, x, x, block_sizes=blocks, **kw) is None


# ---------------------------------------------------------------------------------------------
# Segments, cu_seqlens, decoding.


def _segmented_inputs(seed=10):
    # Row 0: segments of length 5, 1 (a length-1 segment), 60, 3, 1 (final one-token segment).
    # Row 1: 40, 30.
    lens = [[5, 1, 60, 3, 1], [40, 30]]
    seg = np.stack([np.repeat(np.arange(len(r)), r) for r in lens]).astype(np.int32)
    q, k, v, g, h0 = specs.Case("seg", 2, 70, 2, 20, 12).make(seed)
    return lens, jnp.asarray(seg), q, k, v, g, h0


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_segments_equal_running_each_segment_alone(impl):
    lens, seg, q, k, v, g, h0 = _segmented_inputs()
    o, final = _op(impl, segment_ids=seg)(q, k, v, g, h0)
    for b, row in enumerate(lens):
        start = 0
        for i, n in enumerate(row):
            sl = functools.partial(lambda x, b, s, n: x[b : b + 1, s : s + n], b=b, s=start, n=n)
            hb = h0[b : b + 1] if i == 0 else None  # h0 belongs to the row's first segment
            o_ref, f_ref = _np_gla(sl(q), sl(k), sl(v), sl(g), 20**-0.5, hb)
            assert_close(o[b : b + 1, start : start + n], o_ref, name=f"o[{b}, seg {i}]")
            start += n
        assert_close(final[b : b + 1], f_ref, name=f"final[{b}]")


def test_segments_xla_gradients_match_reference():
    _, seg, q, k, v, g, h0 = _segmented_inputs(11)
    check_forward_and_vjp(
        _op("xla", segment_ids=seg), _op("reference", segment_ids=seg), [q, k, v, g, h0]
    )


@pytest.mark.parametrize("impl", [pytest.param("reference", marks=pytest.mark.slow), "xla"])
def test_cu_seqlens_per_sequence_states(impl):
    lens = [15, 0, 1, 50, 4]  # includes an empty sequence and a one-token sequence
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    T, H, K, V = int(cu[-1]), 2, 16, 24
    q, k, v, g, _ = specs.Case("cu", 1, T, H, K, V).make(12, initial_state=False)
    h0 = jax.random.normal(jax.random.key(13), (len(lens), H, K, V))
    fn = lambda q, k, v, g, h0: chunk_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, implementation=impl
    )
    o, final = fn(q, k, v, g, h0)
    assert final.shape == (len(lens), H, K, V)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        sl = functools.partial(lambda x, a, b: x[:, a:b], a=a, b=b)
        o_ref, f_ref = _np_gla(sl(q), sl(k), sl(v), sl(g), K**-0.5, h0[n : n + 1])
        if b > a:
            assert_close(o[:, a:b], o_ref, name=f"o seq {n}")
        assert_close(final[n : n + 1], f_ref, name=f"final seq {n}")
    if impl == "xla":  # gradients through the per-sequence states agree with the reference path
        ref = lambda q, k, v, g, h0: chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            implementation="reference",
        )
        check_forward_and_vjp(fn, ref, [q, k, v, g, h0])


@pytest.mark.parametrize("impl", ["xla", pytest.param("reference", marks=pytest.mark.slow)])
def test_decoding_continues_chunked_prefill(impl):
    q, k, v, g, h0 = specs.Case("dec", 2, 77, 2, 32, 16).make(14)
    o_full, s_full = _op("xla")(q, k, v, g, h0)
    P = 70
    o_pre, s = _op("xla")(q[:, :P], k[:, :P], v[:, :P], g[:, :P], h0)
    outs = [o_pre]
    for t in range(P, 77):
        o_t, s = fused_recurrent_gla(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            initial_state=s,
            output_final_state=True,
            implementation=impl,
        )
        outs.append(o_t)
    assert_close(jnp.concatenate(outs, axis=1), o_full, tol=1e-4)
    assert_close(s, s_full, tol=1e-4)


def test_fused_recurrent_matches_reference_gradients():
    args = specs.Case("r", 2, 9, 2, 8, 8).make(15)
    rec = lambda q, k, v, g, h0: fused_recurrent_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, implementation="xla"
    )
    check_forward_and_vjp(rec, REF, args)


# ---------------------------------------------------------------------------------------------
# Bad, empty and non-finite inputs.


def test_bad_inputs_raise_clear_errors():
    q, k, v, g, h0 = specs.Case("bad", 2, 8, 2, 16, 8).make(16)
    with pytest.raises(ValueError, match="k must have shape"):
        chunk_gla(q, k[:, :4], v, g)
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_gla(q, k, v, g[..., 0])  # wrong rank
    with pytest.raises(ValueError, match="v must have shape"):
        chunk_gla(q, k, v[:, :, :1], g)
    with pytest.raises(TypeError, match="initial_state must have dtype"):
        chunk_gla(q, k, v, g, initial_state=h0.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_gla(q, k, v, g, initial_state=h0[:1])
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        chunk_gla(q, k, v, g, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must have dtype"):
        chunk_gla(q, k, v, g, segment_ids=jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(ValueError, match="cu_seqlens requires batch size B == 1"):
        chunk_gla(q, k, v, g, cu_seqlens=jnp.array([0, 8]))
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        chunk_gla(q, k, v, g, chunk_size=48)
    with pytest.raises(TypeError, match="q must be an array"):
        chunk_gla([1.0], k, v, g)
    big = jnp.zeros((1, 4, 1, 300))
    with pytest.raises(UnsupportedImplementationError, match="exceed 256"):
        chunk_gla(big, big, big, big, implementation="pallas_tpu")
    with pytest.raises(UnsupportedImplementationError, match="not known"):
        chunk_gla(q, k, v, g, implementation="cuda")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        fused_recurrent_gla(q, k, v, g, initial_state=h0[:, :1])
    # Positive gates are allowed (the recurrence grows, as written).
    o, _ = chunk_gla(q, k, v, jnp.abs(g) * 0.01)
    assert np.all(np.isfinite(o))


def test_empty_sequence():
    q, k, v, g, h0 = specs.Case("empty", 2, 0, 2, 16, 8).make(17)
    o, final = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 2, 8)
    np.testing.assert_array_equal(final, h0)
    o, final = fused_recurrent_gla(q, k, v, g, output_final_state=True)
    assert o.shape == (2, 0, 2, 8) and final.shape == (2, 2, 16, 8)


def test_non_finite_inputs_propagate_only_to_their_row():
    # A NaN reaches every later output of its row (and, through the chunk's matmuls, the earlier
    # positions of its chunk), never another row.
    q, k, v, g, h0 = specs.Case("nan", 2, 70, 2, 16, 8).make(18)
    v = v.at[0, 30].set(jnp.nan)
    for impl in ("xla", "reference"):
        o, final = _op(impl)(q, k, v, g, h0)
        assert np.all(np.isfinite(o[1])) and np.all(np.isfinite(final[1]))
        assert np.all(np.isnan(o[0, 30:])) and np.all(np.isnan(final[0]))


def test_default_scale_and_dispatch_on_cpu():
    q, k, v, g, h0 = specs.Case("d", 1, 10, 2, 16, 8).make(19)
    o, _ = chunk_gla(q, k, v, g)  # implementation=None picks xla on CPU
    o2, _ = gla_reference(q, k, v, g, scale=16**-0.5)
    assert_close(o, o2)
    jitted = jax.jit(functools.partial(chunk_gla, implementation="xla"))
    assert_close(jitted(q, k, v, g)[0], o2)


# ---------------------------------------------------------------------------------------------
# −inf gates (hard resets, log 0): every implementation resets the state as the token loop does.


def _reset_gates(g):
    """g with −inf at the first token, mid-chunk, on both sides of a chunk boundary (chunk 16)
    and a whole position (every head and channel); per head and key channel, as a gate is."""
    g = g.at[:, 0, 0, :3].set(-jnp.inf)  # first token, three channels of head 0
    g = g.at[:, 5, 1, :].set(-jnp.inf)  # mid-chunk, every channel of head 1
    g = g.at[:, 15, 0, 4:9].set(-jnp.inf)  # last row of the first chunk
    g = g.at[:, 16, 1, 2].set(-jnp.inf)  # first row of the second chunk
    return g.at[:, 27].set(-jnp.inf)  # a full reset


def test_reference_resets_on_minus_inf_gates():
    # The specification itself against an independent float64 loop (np.exp(-inf) = 0).
    q, k, v, g, h0 = specs.Case("inf", 2, 40, 2, 16, 12).make(30)
    g = _reset_gates(g)
    o, final = REF(q, k, v, g, h0)
    o64, final64 = _np_gla(q, k, v, g, 16**-0.5, h0)
    assert_close((o, final), (o64, final64), tol=1e-5)
    # Full reset at 27: what follows does not depend on what came before.
    o2, _ = REF(q, k.at[:, :27].set(0.0), v, g, h0 * 0)
    np.testing.assert_allclose(o2[:, 27:], o[:, 27:], rtol=1e-5, atol=1e-6)
    _all_grads_finite(REF, (q, k, v, g, h0))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("segments", [False, True], ids=["dense", "segments"])
def test_minus_inf_gates_match_reference(impl, segments):
    # Forward and VJP equal to the reference (finite everywhere, asserted by assert_close),
    # chunk 16 over T = 40: three chunks, the last one partial.
    q, k, v, g, h0 = specs.Case("inf", 2, 40, 2, 16, 12).make(31)
    g = _reset_gates(g)
    seg = _segment_ids([[3, 14, 10, 13], [20, 20]]) if segments else None
    with interpret():
        check_forward_and_vjp(
            _op(impl, chunk_size=16, segment_ids=seg),
            _op("reference", chunk_size=16, segment_ids=seg),
            [q, k, v, g, h0],
            tol=1e-4,
        )


def test_minus_inf_gates_with_cu_seqlens_and_decoding():
    cu = jnp.asarray([0, 6, 6, 30, 40], jnp.int32)
    q, k, v, g, _ = specs.Case("infcu", 1, 40, 2, 16, 12).make(32, initial_state=False)
    g = _reset_gates(g)
    h0 = jax.random.normal(jax.random.key(33), (4, 2, 16, 12))
    run = lambda impl: jax.jit(
        lambda q, k, v, g, h0: chunk_gla(
            q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
            chunk_size=16, implementation=impl,
        )
    )  # fmt: skip
    check_forward_and_vjp(run("xla"), run("reference"), [q, k, v, g, h0], tol=1e-4)
    rec = lambda q, k, v, g, h0: fused_recurrent_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, implementation="xla"
    )
    q, k, v, g, h0 = specs.Case("infrec", 2, 40, 2, 16, 12).make(34)
    check_forward_and_vjp(rec, REF, [q, k, v, _reset_gates(g), h0], tol=1e-4)


def test_gates_below_the_floor_equal_minus_inf():
    # Gates whose exp is 0 in fp32 are resets too; the chunked forms take them as GATE_FLOOR.
    q, k, v, g, h0 = specs.Case("floor", 1, 40, 2, 16, 12).make(35)
    inf = _reset_gates(g)
    big = jnp.where(jnp.isneginf(inf), -1e30, inf)
    xla = _op("xla", chunk_size=16)
    assert xla_gla.GATE_FLOOR < -104  # exp(GATE_FLOOR) == 0 in fp32
    np.testing.assert_array_equal(np.exp(np.float32(xla_gla.GATE_FLOOR)), 0.0)
    assert_close(xla(q, k, v, big, h0), xla(q, k, v, inf, h0), tol=1e-6)


# ---------------------------------------------------------------------------------------------
# cu_seqlens values and argument types.


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([1, 4, 8], r"cu_seqlens must start at 0, got cu_seqlens\[0\]=1 in \[1, 4, 8\]"),
        ([0, 5, 3, 8], r"non-decreasing, got cu_seqlens\[1\]=5 > cu_seqlens\[2\]=3"),
        ([0, 4, 7], r"must end at T=8 .*got cu_seqlens\[-1\]=7 in \[0, 4, 7\]"),
        ([0, 4, 9], r"must end at T=8 .*got cu_seqlens\[-1\]=9"),
    ],
)
def test_cu_seqlens_values_are_validated(cu, match):
    q, k, v, g, _ = specs.Case("cu", 1, 8, 2, 16, 8).make(36, initial_state=False)
    for as_array in (np.asarray, jnp.asarray):  # numpy and concrete jax arrays
        with pytest.raises(ValueError, match=match):
            chunk_gla(q, k, v, g, cu_seqlens=as_array(np.asarray(cu, np.int32)))


def test_traced_cu_seqlens_with_bad_values_give_nan():
    # Under jit the values cannot be checked at trace time: they are checked on device and
    # invalid ones make every output NaN rather than silently wrong.
    q, k, v, g, _ = specs.Case("cu", 1, 8, 2, 16, 8).make(37, initial_state=False)
    fn = jax.jit(lambda cu: chunk_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True))
    o, final = fn(jnp.asarray([0, 3, 8], jnp.int32))
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(final))
    assert_close(o, chunk_gla(q, k, v, g, cu_seqlens=np.asarray([0, 3, 8]))[0])
    for bad in ([1, 3, 8], [0, 5, 3], [0, 3, 7]):
        o, final = fn(jnp.asarray(bad, jnp.int32))
        assert np.all(np.isnan(o)) and np.all(np.isnan(final)), bad


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(scale="abc"), TypeError, "scale must be None or a real number, got str 'abc'"),
        (dict(scale=True), TypeError, "scale must be None or a real number, got bool"),
        (dict(scale=[1.0]), TypeError, "scale must be None or a real number, got list"),
        (dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),
        (dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
        (dict(output_final_state="no"), TypeError, "output_final_state must be a bool, got str"),
        (dict(output_final_state=1), TypeError, "output_final_state must be a bool, got int"),
        (dict(chunk_size=16.0), TypeError, "chunk_size must be an int .* got float 16.0"),
        (dict(chunk_size="64"), TypeError, "chunk_size must be an int .* got str '64'"),
        (dict(implementation=3), TypeError, "implementation must be None or a str, got int 3"),
    ],
)
def test_wrong_argument_types_name_the_argument(kw, exc, match):
    q, k, v, g, _ = specs.Case("types", 1, 8, 2, 16, 8).make(38)
    with pytest.raises(exc, match=f"^chunk_gla: {match}"):
        chunk_gla(q, k, v, g, **kw)
    if "chunk_size" not in kw:
        with pytest.raises(exc, match=f"^fused_recurrent_gla: {match}"):
            fused_recurrent_gla(q, k, v, g, **kw)


def test_scale_accepts_numbers_and_concrete_scalars():
    q, k, v, g, _ = specs.Case("scale", 1, 8, 2, 16, 8).make(39)
    want, _ = chunk_gla(q, k, v, g, scale=0.5)
    for s in (np.float32(0.5), jnp.float32(0.5), 1 / 2):
        np.testing.assert_array_equal(chunk_gla(q, k, v, g, scale=s)[0], want)
    np.testing.assert_array_equal(
        chunk_gla(q, k, v, g, scale=1)[0], chunk_gla(q, k, v, g, scale=1.0)[0]
    )
    with pytest.raises(TypeError, match="scale must be a concrete number"):
        jax.jit(lambda s: chunk_gla(q, k, v, g, scale=s))(0.5)


# ---------------------------------------------------------------------------------------------
# precision=, resource budgets, cu_seqlens final states against each sequence alone.


@pytest.mark.parametrize("precision", ["highest", "tf32"])
def test_pallas_gpu_dots_follow_precision(precision):
    # Every tt.dot of the exported forward and backward Triton kernels, fp32 operands: IEEE by
    # default, TF32 when asked for (Triton prints no inputPrecision for IEEE).
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = [sd(1, 40, 2, 16), sd(1, 40, 2, 16), sd(1, 40, 2, 24), sd(1, 40, 2, 16)]

    def loss(q, k, v, g):
        o, s = chunk_gla(
            q, k, v, g, output_final_state=True, chunk_size=16, implementation="pallas_gpu",
            precision=precision,
        )  # fmt: skip
        return jnp.sum(o) + jnp.sum(s)

    text = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), args, "cuda")
    dots = triton_dot_precisions(text)
    assert len(dots) >= 10, dots  # forward, states, dstates and the gradient kernel's products
    want = "ieee" if precision == "highest" else "tf32"
    assert dots == [want] * len(dots)


def test_invalid_precision_raises():
    q, k, v, g, _ = specs.Case("p", 1, 8, 2, 16, 8).make(41)
    for bad in ("fp32", None, jax.lax.Precision.HIGHEST):
        with pytest.raises(ValueError, match=r"^chunk_gla: precision must be one of"):
            chunk_gla(q, k, v, g, precision=bad)
        with pytest.raises(ValueError, match=r"^fused_recurrent_gla: precision must be one of"):
            fused_recurrent_gla(q, k, v, g, precision=bad)
    # "tf32" runs everywhere (on CPU XLA multiplies fp32 in fp32 either way).
    o, _ = chunk_gla(q, k, v, g, precision="tf32", implementation="xla")
    assert_close(o, REF(q, k, v, g, None)[0])


_DOCUMENTED = (*specs.LOWERING_CASES, *specs.BENCHMARK_CASES, *specs.GPU_BENCHMARK_CASES)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_default_block_sizes_fit_the_documented_shapes(backend):
    limits = resources.H100 if backend == "pallas_gpu" else resources.TPU_V5E
    for case in _DOCUMENTED:
        for segments in (False, True):
            sets = _common.working_set(
                backend, case.T, case.K, case.V, case.dtype, segments=segments
            )
            suffix = backend.split("_")[1]
            assert [ws.kernel for ws in sets] == [
                f"gla_{n}_{suffix}" for n in _common.KERNELS[backend]
            ]
            for ws in sets:
                assert ws.check(limits) is None, (case.name, ws)
    # The gradient kernel's fp32 states are [K, block_v], not [K, V]: at K = V = 256 a full
    # [K, V] block (block_v = 256) cannot fit however many warps.
    full = _common.working_set(backend, 2048, 256, 256, "bfloat16", BlockSizes(block_v=256))
    if backend == "pallas_gpu":
        assert full[3].check(limits) is not None and "gla_grads_gpu" in full[3].check(limits)


def test_working_set_by_hand():
    # GPU states kernel, T = 64, K = V = 128 fp32, defaults (C = 64, block_v = 64, 4 warps):
    # the state S [128, 64] + k ⊙ e^{G_L - G} [64, 128] + v [64, 64], fp32, over 128 threads.
    states = _common.working_set("pallas_gpu", 64, 128, 128, "float32")[1]
    assert states.kernel == "gla_states_gpu" and states.num_warps == 4
    live = 128 * 64 * 4 + 64 * 128 * 4 + 64 * 64 * 4
    assert states.live_bytes == live == 81920
    assert states.registers_per_thread == 81920 // 4 // 128 + resources.REGISTER_OVERHEAD == 192
    # TPU states kernel, bf16, K = V = 128, C = 64, block_v = 128: k [64, 128] bf16, G [64, 128]
    # fp32, v [64, 128] bf16, gl [128, 1] fp32 (lane-padded to [128, 128]), h0, h, ht [128, 128]
    # fp32, double-buffered, plus the [128, 128] fp32 scratch.
    tpu = _common.working_set("pallas_tpu", 64, 128, 128, "bfloat16")[1]
    blocks = 16384 + 32768 + 16384 + 65536 + 3 * 65536
    assert tpu.vmem_bytes == 2 * blocks + 65536 == 720896


def test_cu_seqlens_final_states_equal_each_sequence_alone():
    # Chunks of 16 over T = 63: sequences crossing two chunk boundaries, several ending in one
    # chunk, an empty and a one-token one. Each sequence alone through chunk_gla (reference)
    # against the packed run (xla kernel + the chunked per-sequence states).
    lens = [5, 0, 1, 37, 3, 17]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    T, H, K, V = int(cu[-1]), 2, 16, 12
    q, k, v, g, _ = specs.Case("cuf", 1, T, H, K, V).make(42, initial_state=False)
    h0 = jax.random.normal(jax.random.key(43), (len(lens), H, K, V))
    o, final = chunk_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16,
        implementation="xla",
    )  # fmt: skip
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        o_n, f_n = chunk_gla(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], initial_state=h0[n : n + 1],
            output_final_state=True, implementation="reference",
        )  # fmt: skip
        assert_close(final[n : n + 1], f_n, tol=1e-5, name=f"final seq {n}")
        if b > a:
            assert_close(o[:, a:b], o_n, tol=1e-5, name=f"o seq {n}")
