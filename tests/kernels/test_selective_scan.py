"""selective_scan: every implementation vs the fp32 reference (forward, last state and the
gradients of u, Δ, A, B, C, D, z, delta_bias), custom_vjp vs autodiff, long sequences on xla,
lowering for cuda/tpu at realistic shapes, errors and edge cases.

The interpreted Pallas kernels run short sequences (L ∈ {1, 7, 65}) with small tiles so that
channel, state and token padding and several tiles/chunks are exercised; long L runs on xla.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import UnsupportedImplementationError, interpret, select_implementation
from jaxblocks.kernels.lowering import export_mlir, triton_dot_precisions
from jaxblocks.kernels.resources import H100, TPU_V5E
from jaxblocks.kernels.selective_scan import (
    BlockSizes,
    _common,
    api,
    pallas_gpu,
    pallas_tpu,
    selective_scan,
    specs,
    xla,
)
from jaxblocks.kernels.selective_scan.specs import LOWERING_CASES, Case, make_inputs
from tests.kernels.harness import (
    assert_close,
    check_custom_vjp_matches_autodiff,
    check_forward_and_vjp,
    check_pallas_lowering,
)

F32, BF16 = jnp.float32, jnp.bfloat16
SLOW = pytest.mark.slow


def _op(case, implementation=None, fn=None):
    """The op with the case's flags, returning (out, last_state)."""
    if fn is None:
        fn = functools.partial(selective_scan, implementation=implementation)
    return lambda *a: fn(*a, delta_softplus=case.softplus, return_last_state=True)


def _ref(case):
    return _op(case, "reference")


# fp32: the kernels (interpreted) and xla are within rel-RMS 1.9e-7 of the fp32 reference
# (measured over the cases below, forward, last state and every gradient; only summation order
# differs); 10x that. bf16 inputs: the harness's 2e-2; measured at most 2.9e-3 (one bf16
# rounding of u, Δ, B, C, ~2e-3 relative, then fp32 throughout).
FP32_TOL = 2e-6
# xla at L = 4096: dA, a sum over all 4096 tokens, reaches 7.4e-7 (measured; 8e-8 elsewhere).
XLA_FP32_TOL = 1e-5


def _tol(case, fp32=FP32_TOL):
    return fp32 if case.dtype == F32 else None


def _kernel(module, **blocks):
    def fn(*a, delta_softplus, return_last_state):
        del return_last_state
        sizes = BlockSizes(**blocks)
        return getattr(module, f"selective_scan_{module.__name__.split('.')[-1]}")(
            *a, delta_softplus=delta_softplus, block_sizes=sizes
        )

    return fn


# --- xla vs reference, up to L = 4096 ---------------------------------------------------------

XLA_CASES = [  # one long grouped case in CI (compiling the scan's gradient dominates)
    Case(1, 8, 4, 4096, G=4),
    pytest.param(Case(2, 6, 4, 1), marks=SLOW),
    pytest.param(Case(3, 8, 3, 65, G=2, dtype=BF16), marks=SLOW),
    pytest.param(Case(2, 8, 16, 1000, with_z=False, softplus=False, with_bias=False), marks=SLOW),
    pytest.param(Case(2, 16, 16, 4096, dtype=BF16), marks=SLOW),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=lambda c: c.name)
def test_xla_matches_reference(case):
    args = make_inputs(case)
    check_forward_and_vjp(
        _op(case, "xla"), _ref(case), args, dtype=case.dtype, tol=_tol(case, XLA_FP32_TOL)
    )


@SLOW
def test_xla_chunk_sizes_agree():
    case = Case(2, 8, 4, 50, G=2)
    args = make_inputs(case, seed=3)
    want = _ref(case)(*args)
    for chunk in (1, 7, 64):
        fn = functools.partial(xla.selective_scan_xla, chunk=chunk)
        got = fn(*args, delta_softplus=True)
        assert_close(got, want, tol=1e-5, name=f"chunk {chunk}")


# --- Pallas kernels under the interpreters ----------------------------------------------------

GPU_CASES = [  # (case, blocks): dim 12 over tiles of 8 pads channels; N=3 pads to 4
    (Case(2, 6, 4, 1, with_D=False, with_z=False, with_bias=False), {}),
    (Case(2, 12, 3, 7, G=2, dtype=BF16), {"gpu_block_d": 8, "gpu_chunk": 4}),
    pytest.param(Case(1, 16, 16, 65), {"gpu_block_d": 8, "gpu_chunk": 16}, marks=SLOW),
]


@pytest.mark.parametrize("case,blocks", GPU_CASES, ids=lambda c: getattr(c, "name", ""))
def test_pallas_gpu_interpret_matches_reference(case, blocks):
    args = make_inputs(case, seed=1)
    fn = jax.jit(_op(case, fn=_kernel(pallas_gpu, **blocks)))
    with interpret():
        check_forward_and_vjp(fn, _ref(case), args, dtype=case.dtype, tol=_tol(case))


TPU_CASES = [  # chunk 8: L=7 is one padded chunk, L=65 nine; dim 12 pads to one 128-lane tile
    (Case(2, 12, 4, 7, G=2), {"tpu_chunk": 8}),
    (Case(1, 4, 16, 65, dtype=BF16, with_z=False), {"tpu_chunk": 16}),
    pytest.param(Case(2, 6, 1, 1, softplus=False), {}, marks=SLOW),
]


@pytest.mark.parametrize("case,blocks", TPU_CASES, ids=lambda c: getattr(c, "name", ""))
def test_pallas_tpu_interpret_matches_reference(case, blocks):
    args = make_inputs(case, seed=2)
    fn = jax.jit(_op(case, fn=_kernel(pallas_tpu, **blocks)))
    with interpret():
        check_forward_and_vjp(fn, _ref(case), args, dtype=case.dtype, tol=_tol(case))


@pytest.mark.parametrize(
    "implementation",
    [pytest.param(i, marks=SLOW) for i in ("pallas_gpu", "pallas_tpu", "xla")],
)
def test_custom_vjp_matches_autodiff_of_reference(implementation):
    # In CI the fp32 interpret cases above check the kernels' VJPs against the reference.
    case = Case(2, 8, 4, 9, G=2)
    args = make_inputs(case, seed=4)
    with interpret():
        fn = jax.jit(_op(case, implementation))
        check_custom_vjp_matches_autodiff(fn, _ref(case), args, tol=1e-4)


# --- long sequences: strong decays and no overflow --------------------------------------------


def test_long_sequence_strong_decay_stays_finite():
    """Δ·A down to -40 per token: exp(-cumsum) rescaling would overflow; the chunked scan won't."""
    case = Case(1, 8, 4, 4096, with_z=False)
    u, dl, A, B, C, D, _, bias = make_inputs(case, seed=5)
    A = A * 20.0
    fn = _op(case, "xla")
    out, last = jax.jit(fn)(u, dl, A, B, C, D, None, bias)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(last)))
    assert_close((out, last), _ref(case)(u, dl, A, B, C, D, None, bias), tol=1e-4)


# --- lowering for cuda and tpu at realistic shapes --------------------------------------------


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering(case, platform):
    implementation = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    args = make_inputs(case, abstract=True)

    def loss(*a):
        out, last = selective_scan(
            *a, delta_softplus=True, return_last_state=True, implementation=implementation
        )
        return jnp.sum(out.astype(F32)) + jnp.sum(last)

    text = check_pallas_lowering(loss, args, platform, op="selective_scan", min_kernels=2)
    sfx = {"cuda": "gpu", "tpu": "tpu"}[platform]
    assert f"selective_scan_fwd_{sfx}" in text and f"selective_scan_bwd_{sfx}" in text


# --- API: defaults, edge cases, errors ---------------------------------------------------------


def test_cpu_default_is_xla_and_last_state_is_optional():
    case = Case(2, 8, 4, 5)
    args = make_inputs(case)
    name, _ = select_implementation("selective_scan", None, api.IMPLEMENTATIONS, *args, True)
    assert name == "xla"
    out = jax.eval_shape(functools.partial(selective_scan, delta_softplus=True), *args)
    assert out.shape == (2, 8, 5) and out.dtype == F32
    fn = functools.partial(selective_scan, return_last_state=True, implementation="reference")
    out, last = jax.eval_shape(fn, *args)
    assert last.shape == (2, 8, 4) and last.dtype == F32


def test_reference_matches_explicit_loop():
    """The reference against a plain numpy loop of Mamba's recurrence (grouped B/C)."""
    case = Case(2, 4, 3, 6, G=2)
    u, dl, A, B, C, D, z, bias = (np.asarray(x, np.float64) for x in make_inputs(case))
    dt = np.log1p(np.exp(dl + bias[None, :, None]))
    out = np.zeros_like(u)
    for b in range(2):
        for d in range(4):
            g = d // 2
            h = np.zeros(3)
            for t in range(6):
                h = np.exp(dt[b, d, t] * A[d]) * h + dt[b, d, t] * B[b, g, :, t] * u[b, d, t]
                y = h @ C[b, g, :, t] + D[d] * u[b, d, t]
                out[b, d, t] = y * z[b, d, t] / (1 + np.exp(-z[b, d, t]))
    fn = functools.partial(selective_scan, delta_softplus=True, implementation="reference")
    got = jax.jit(fn)(*make_inputs(case))
    assert_close(got, out, tol=1e-5)


def test_empty_sequence():
    args = make_inputs(Case(2, 8, 4, 3))
    args = tuple(None if x is None else x[..., :0] if x.ndim == 3 else x for x in args)
    out, last = selective_scan(*args, return_last_state=True, implementation="pallas_gpu")
    assert out.shape == (2, 8, 0)
    np.testing.assert_array_equal(last, np.zeros((2, 8, 4)))


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_gpu"])
def test_nonfinite_input_stays_in_its_row_and_channel(implementation):
    case = Case(2, 8, 4, 9, with_z=False)
    u, dl, A, B, C, D, z, bias = make_inputs(case)
    u = u.at[0, 3, 4].set(jnp.nan)
    with interpret():
        out = selective_scan(u, dl, A, B, C, D, z, bias, True, implementation=implementation)
    out = np.asarray(out)
    assert np.all(np.isnan(out[0, 3, 4:]))  # the poisoned channel, from t = 4 on
    assert np.all(np.isfinite(out[0, 3, :4]))
    assert np.all(np.isfinite(out[1]))  # other batch row
    assert np.all(np.isfinite(np.delete(out[0], 3, axis=0)))  # other channels


def _good():
    return make_inputs(Case(2, 8, 4, 5, G=2))


def _set(i, f):
    return lambda a: a[:i] + (f(a[i]),) + a[i + 1 :]


@pytest.mark.parametrize(
    "mutate,kwargs,exc,match",
    [
        (_set(0, lambda x: x[0]), {}, ValueError, "u must have rank 3"),
        (_set(1, lambda x: x[:, :, :4]), {}, ValueError, r"delta must have shape \(2, 8, 5\)"),
        (_set(2, lambda x: x[:6]), {}, ValueError, r"A must have shape \(dim=8"),
        (_set(3, lambda x: x[:, :, :, :4]), {}, ValueError, r"B must have shape \(2, 2, 4, 5\)"),
        (_set(3, lambda x: jnp.ones((2, 3, 4, 5))), {}, ValueError, "G > 0 dividing dim=8"),
        (_set(4, lambda x: x[:, 0]), {}, ValueError, "C must have the shape of B"),
        (_set(5, lambda x: x[:4]), {}, ValueError, r"D must have shape \(8,\)"),
        (_set(6, lambda x: x[:1]), {}, ValueError, r"z must have shape \(2, 8, 5\)"),
        (_set(7, lambda x: x[None]), {}, ValueError, r"delta_bias must have shape \(8,\)"),
        (_set(0, lambda x: x.astype(jnp.int32)), {}, TypeError, "u must have dtype"),
        (_set(2, lambda x: x.astype(jnp.complex64)), {}, TypeError, "A must have dtype"),
        (_set(4, lambda x: None), {}, TypeError, "C is required"),
        (lambda a: a, {"implementation": "cuda"}, UnsupportedImplementationError, "available"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, kwargs, exc, match):
    args = mutate(_good())
    with pytest.raises(exc, match=match):
        selective_scan(*args, **kwargs)


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(gpu_block_d=24)
    with pytest.raises(ValueError, match="multiple of 128"):
        BlockSizes(tpu_block_d=64)
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(tpu_chunk=12)


# --- block_sizes through the public function, supports predicates -----------------------------


def _pallas_calls(jaxpr) -> dict:
    """``{kernel name: (grid, compiler_params)}`` of every pallas_call in ``jaxpr``, nested too."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found[eqn.params["name"]] = (
                tuple(eqn.params["grid_mapping"].grid),
                eqn.params["compiler_params"],
            )
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found.update(_pallas_calls(sub))
    return found


# dim 20 in 2 groups: H = 10 channels, two GPU tiles of 8 (one padded) where the default 32 is
# one; L = 21 in GPU chunks of 3 (7 chunks) and TPU chunks of 8 (3 chunks, the last padded) where
# the TPU default is one chunk of 24. tpu_block_d = 256 pads the 10 channels to two lane tiles.
NON_DEFAULT = BlockSizes(gpu_block_d=8, gpu_chunk=3, num_warps=2, tpu_block_d=256, tpu_chunk=8)
NON_DEFAULT_GRIDS = {
    "pallas_gpu": {"selective_scan_fwd_gpu": (4, 2), "selective_scan_bwd_gpu": (4, 2)},
    "pallas_tpu": {"selective_scan_fwd_tpu": (4, 1, 3), "selective_scan_bwd_tpu": (4, 1, 3)},
}


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_public_block_sizes_reach_the_kernels_and_match_reference(implementation):
    case = Case(2, 20, 3, 21, G=2)
    args = make_inputs(case, seed=6)
    fn = functools.partial(selective_scan, implementation=implementation, block_sizes=NON_DEFAULT)
    with interpret():
        calls = _pallas_calls(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a))))(*args).jaxpr)
        check_forward_and_vjp(jax.jit(_op(case, fn=fn)), _ref(case), args, tol=FP32_TOL)
    assert {name: grid for name, (grid, _) in calls.items()} == NON_DEFAULT_GRIDS[implementation]
    if implementation == "pallas_gpu":
        assert all(params.num_warps == 2 for _, params in calls.values())


@pytest.mark.parametrize(
    "field,value,exc",
    [
        ("gpu_block_d", 0, ValueError),
        ("gpu_block_d", 48, ValueError),
        ("gpu_chunk", 65, ValueError),
        ("num_warps", 0, ValueError),
        ("num_stages", -1, ValueError),
        ("tpu_block_d", 192, ValueError),
        ("tpu_chunk", 0, ValueError),
        ("tpu_chunk", 8.0, TypeError),
        ("gpu_chunk", True, TypeError),
    ],
)
def test_invalid_block_sizes_name_the_field(field, value, exc):
    with pytest.raises(exc, match=rf"BlockSizes\.{field} must .*got .*{value!r}"):
        BlockSizes(**{field: value})


def test_block_sizes_is_exported_with_valid_defaults():
    assert api.BlockSizes is BlockSizes and pallas_gpu.BlockSizes is BlockSizes
    assert api.default_block_sizes() == BlockSizes()


@pytest.mark.parametrize("bad", ["x", {"gpu_block_d": 8}, pallas_gpu.TRITON_MAX_NUMEL])
def test_block_sizes_of_the_wrong_type_raise(bad):
    want = rf"block_sizes must be None or a .*BlockSizes, got {type(bad).__name__} "
    with pytest.raises(TypeError, match=want):
        selective_scan(*_good(), block_sizes=bad)


def test_supports_accepts_the_test_and_lowering_shapes():
    cases = [c for c, _ in GPU_CASES[:2]] + [c for c, _ in TPU_CASES[:2]]
    for case in [*cases, *LOWERING_CASES, *specs.BENCHMARK_CASES, Case(1, 8, 256, 4096)]:
        args = make_inputs(case, abstract=True)
        # N = 256: a [32, 256] state per program does not fit the registers; 4 channels do.
        gpu = BlockSizes(gpu_block_d=4) if case.N == 256 else BlockSizes()
        assert pallas_gpu.supports(*args, case.softplus, block_sizes=gpu) is None, case.name
        assert pallas_tpu.supports(*args, case.softplus, block_sizes=BlockSizes()) is None


def test_default_blocks_fit_at_the_documented_shapes():
    """Every kernel's working set at the lowering and benchmark shapes, both backends."""
    for case in [*LOWERING_CASES, *specs.BENCHMARK_CASES]:
        G = case.G or 1
        shape = (case.batch * G, case.dim // G, case.N, case.L)
        gpu = _common.working_set("pallas_gpu", *shape)
        tpu = _common.working_set("pallas_tpu", *shape)
        assert [w.kernel for w in gpu] == ["selective_scan_fwd_gpu", "selective_scan_bwd_gpu"]
        assert [w.kernel for w in tpu] == ["selective_scan_fwd_tpu", "selective_scan_bwd_tpu"]
        assert all(w.check(H100) is None for w in gpu), case.name
        assert all(w.check(TPU_V5E) is None for w in tpu), case.name


def test_working_set_by_hand():
    # TPU forward at b2 d768 N16 L1024: chunk 64; (64, 128) fp32 blocks u, Δ, y = 32 KiB each,
    # (64, N -> 128 lanes) B, C = 32 KiB each, (N = 16, 128) A, last, hs = 8 KiB each, all
    # double-buffered, + the (16, 128) state scratch.
    fwd, _ = _common.working_set("pallas_tpu", 2, 768, 16, 1024)
    assert fwd.vmem_bytes == 2 * (5 * 64 * 128 * 4 + 3 * 16 * 128 * 4) + 16 * 128 * 4
    # GPU backward: (2·8 + 4) [32, 16] fp32 tensors over 128 threads, + 32 overhead registers.
    _, bwd = _common.working_set("pallas_gpu", 2, 768, 16, 1024)
    assert bwd.registers_per_thread == 20 * 32 * 16 // 128 + 32 == 112


@pytest.mark.parametrize(
    "implementation,N,L,block_sizes,match",
    [
        ("pallas_gpu", 32, 5, BlockSizes(gpu_block_d=2**16), r"65536x32 = 2097152 elements"),
        ("pallas_gpu", 40000, 5, BlockSizes(), r"32x65536 .*\(N=40000 padded.*Triton's 1048576"),
        ("pallas_gpu", 128, 5, BlockSizes(), r"selective_scan_bwd_gpu: ~672 registers per thread"),
        (
            "pallas_tpu",
            512,
            64,
            BlockSizes(),
            r"selective_scan_bwd_tpu: ~.* MiB of VMEM .*\(N=512, tpu_chunk=64, tpu_block_d=128\)",
        ),
        ("pallas_tpu", 256, 130, BlockSizes(tpu_chunk=128), r"_bwd_tpu: .*N=256, tpu_chunk=128"),
    ],
)
def test_unsupported_shapes_raise_with_the_reason(implementation, N, L, block_sizes, match):
    case = Case(1, 8, N, L, with_z=False)
    args = make_inputs(case, seed=7)
    with pytest.raises(UnsupportedImplementationError, match=match):
        selective_scan(
            *args, delta_softplus=True, implementation=implementation, block_sizes=block_sizes
        )
    # automatic dispatch on this CPU machine is unaffected (xla)
    name, _ = select_implementation(
        "selective_scan", None, api.IMPLEMENTATIONS, *args, True, block_sizes=block_sizes
    )
    assert name == "xla"


# --- checkpoint interval: saved states every `checkpoint_every` tokens -------------------------


def _saved_states(jaxpr, name):
    """Segments of the saved-state output (the forward's third) of kernel ``name``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call" and eqn.params["name"] == name:
            return eqn.outvars[2].aval.shape[1]
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                found = hasattr(getattr(sub, "jaxpr", sub), "eqns") and _saved_states(
                    getattr(sub, "jaxpr", sub), name
                )
                if found:
                    return found
    return None


# L = 21 tokens. GPU chunks of 3: 7 chunks; every 6 tokens = 2 chunks -> 4 segments (the last
# padded by a chunk), 5 tokens rounds up to the same 2 chunks, 21 = one segment. TPU chunks of 8:
# 3 chunks; every 16 tokens = 2 chunks -> 2 segments (one padded chunk), 8 = one per chunk.
CHECKPOINTS = [
    ("pallas_gpu", dict(gpu_block_d=8, gpu_chunk=3, checkpoint_every=6), 4),
    pytest.param("pallas_gpu", dict(gpu_chunk=3, checkpoint_every=5), 4, marks=SLOW),
    ("pallas_gpu", dict(gpu_block_d=8, gpu_chunk=3, checkpoint_every=21), 1),
    ("pallas_tpu", dict(tpu_chunk=8, checkpoint_every=16), 2),
    pytest.param("pallas_tpu", dict(tpu_chunk=8, checkpoint_every=8), 3, marks=SLOW),
]


@pytest.mark.parametrize("implementation,blocks,segments", CHECKPOINTS)
def test_gradients_at_checkpoint_intervals(implementation, blocks, segments):
    case = Case(1, 12, 4, 21, G=2)
    args = make_inputs(case, seed=8)
    fn = functools.partial(
        selective_scan, implementation=implementation, block_sizes=BlockSizes(**blocks)
    )
    sfx = implementation.split("_")[1]
    with interpret():
        jaxpr = jax.make_jaxpr(lambda *a: fn(*a, delta_softplus=True))(*args).jaxpr
        assert _saved_states(jaxpr, f"selective_scan_fwd_{sfx}") == segments
        check_forward_and_vjp(jax.jit(_op(case, fn=fn)), _ref(case), args, tol=FP32_TOL)


def test_default_checkpoint_interval_and_saved_bytes():
    """About sqrt(L / chunk) saved states per channel, preferring a divisor of the chunk count.

    Mamba (d_inner 1536, N 16, L 2048, batch 2) on the GPU kernel (chunks of 8): one state per
    chunk was 2·256·1536·16·4 B = 50.3 MB; one per 16 chunks (128 tokens) is 3.1 MB, and the
    backward's workspace is another 16 states per channel, live only during the kernel.
    """
    blocks = BlockSizes()
    assert _common.checkpoint_chunks(blocks, 8, 2048) == 16  # 256 chunks
    assert _common.checkpoint_chunks(blocks, 64, 2048) == 8  # 32 chunks: 6 -> divisor 8
    assert _common.checkpoint_chunks(blocks, 3, 21) == 3  # 7 chunks, no divisor in [3, 6]
    assert _common.checkpoint_chunks(BlockSizes(checkpoint_every=10**6), 8, 100) == 13
    before = _common.saved_state_bytes(2, 1536, 16, 2048, 8, 1)
    after = _common.saved_state_bytes(2, 1536, 16, 2048, 8, 16)
    assert before == 2 * 256 * 1536 * 16 * 4 == 50_331_648
    assert after == before // 16 == 3_145_728
    with pytest.raises(ValueError, match=r"BlockSizes\.checkpoint_every must be None or positive"):
        BlockSizes(checkpoint_every=0)


# --- precision: accepted everywhere; only the xla readout has a product -----------------------


def test_invalid_precision_raises():
    with pytest.raises(ValueError, match=r"selective_scan: precision must be one of"):
        selective_scan(*_good(), precision="fp32")


@pytest.mark.parametrize("precision, want", [("highest", "HIGHEST"), ("tf32", "DEFAULT")])
def test_xla_readout_uses_the_precision(precision, want):
    args = _good()
    fn = functools.partial(selective_scan, implementation="xla", precision=precision)
    text = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 3)))(*args))
    found = set(re.findall(r"precision=\(?Precision\.(\w+)", text))
    assert found == {want}, found


def test_pallas_gpu_kernels_have_no_matrix_products():
    """The kernels are elementwise: no tt.dot in the exported value_and_grad, so ``precision``
    has nothing to change there (fp32 inputs, where a dot would lower to TF32)."""
    case = Case(2, 64, 16, 40)
    args = make_inputs(case, abstract=True)
    loss = lambda *a: jnp.sum(selective_scan(*a, True, implementation="pallas_gpu"))
    text = export_mlir(jax.value_and_grad(loss, argnums=(0, 1, 3)), args, "cuda")
    assert "selective_scan_bwd_gpu" in text
    # The forward alone goes through the toolkit's reader; the backward's `debug_barrier` lowers
    # to `gpu.barrier`, a dialect `lowering.triton_modules` does not register, so its Triton IR
    # is parsed here with unregistered dialects allowed.
    fwd = export_mlir(loss, args, "cuda")
    assert triton_dot_precisions(fwd) == []
    kernels = _triton_texts(text)
    assert len(kernels) == 2 and all("tt.dot" not in k for k in kernels)
    assert "gpu.barrier" in kernels[1] or "gpu.barrier" in kernels[0]


def _triton_texts(mlir_text):
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    from jaxblocks.kernels import lowering

    texts = []
    for m in lowering._TRITON_IR.finditer(mlir_text):
        ctx = ir.Context()
        ctx.allow_unregistered_dialects = True
        tt_dialect.register_dialect(ctx)
        with ctx:
            texts.append(str(ir.Module.parse(lowering._unescape_mlir_string(m.group(1)))))
    return texts
