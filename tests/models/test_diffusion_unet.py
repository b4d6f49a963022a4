"""`DiffusionUNet`: the denoiser and objective call forms, the OMS configuration, guided
sampling with and without One More Step, the ``diffusion`` task, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.diffusion import inference_timesteps, oms_step, sample
from jaxblocks.models.diffusion_unet import (
    DiffusionUNet,
    DiffusionUNetConfig,
    generate,
    guided_denoiser,
    pack_labels,
    schedule_of,
)
from jaxblocks.train.tasks import get_task

TINY = dict(widths=(8, 16), num_groups=4, num_heads=2, num_timesteps=50)
# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
    return jax.jit(f, compiler_options=FAST_COMPILE, **kw)


def _images(seed=0, b=3):
    return jax.random.uniform(jax.random.key(seed), (b, 8, 8, 1), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def base():
    model = DiffusionUNet(**TINY)
    x = pack_labels(_images(), jnp.array([1, 4, 9]))
    variables = jit(model.init)(jax.random.key(1), x)
    # Perturb the zero-initialised output convs so outputs depend on every input.
    variables = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), variables
    )
    return model, variables


def test_pack_labels_round_trip():
    x, y = np.asarray(_images()), np.array([1, 4, 9], np.int32)
    p = pack_labels(x, y)
    assert isinstance(p, np.ndarray) and p.shape == (3, 8, 8, 2)
    np.testing.assert_array_equal(p[..., :1], x)
    np.testing.assert_array_equal(p[..., 1], np.broadcast_to(y[:, None, None], (3, 8, 8)))
    with pytest.raises(ValueError, match="labels"):
        pack_labels(x, y[:2])


def test_denoiser_depends_on_t_and_label(base):
    model, v = base
    x, t, y = _images(2), jnp.array([0, 20, 49]), jnp.array([1, 4, 10])
    out = model.apply(v, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.abs(out - model.apply(v, x, t + 1, y)).max() > 1e-4
    assert np.abs(out - model.apply(v, x, t, jnp.full((3,), 10))).max() > 1e-4  # null label


def test_objective_is_q_sample_and_v_target(base):
    model, v = base
    x0, y = _images(3), jnp.array([2, 3, 5])
    packed = pack_labels(x0, y)
    out = model.apply(v, packed)
    assert out.shape == (3, 8, 8, 1, 2)
    # Evaluation (no rng): a fixed draw, the same every call.
    np.testing.assert_array_equal(out, model.apply(v, packed))
    trained = model.apply(v, packed, train=True, rngs={"dropout": jax.random.key(5)})
    assert np.abs(trained - out).max() > 1e-4
    # Terminal timestep of a zero-SNR schedule: x_T is the noise and the v target is −x₀.
    terminal = DiffusionUNet(**TINY, train_timesteps="terminal")
    out = terminal.apply(v, packed)
    np.testing.assert_allclose(out[..., 1], -x0, atol=1e-6)
    assert schedule_of(terminal)[-1] == 0.0
    loss = get_task("diffusion").metrics(out, y)
    np.testing.assert_allclose(
        loss["loss"], jnp.mean(jnp.square(out[..., 0] - out[..., 1]), axis=(1, 2, 3)), rtol=1e-6
    )
    with pytest.raises(ValueError, match="last axis of 2"):
        get_task("diffusion").metrics(out[..., 0], y)


def test_oms_module_is_time_free():
    oms = DiffusionUNet(**TINY, time_conditioning=False, train_timesteps="terminal")
    x, y = _images(4), jnp.array([0, 1, 2])
    v = jit(oms.init, static_argnums=2)(jax.random.key(0), x, None, y)
    assert not any("time" in k for k in v["params"])
    np.testing.assert_array_equal(oms.apply(v, x, None, y), oms.apply(v, x, jnp.arange(3), y))


def test_guidance_and_generate_with_oms(base):
    model, v = base
    labels = jnp.array([1, 4, 9])
    x, t = _images(5), jnp.array([3, 3, 3])
    cond = guided_denoiser(model, v, labels, 1.0)(x, t)
    np.testing.assert_allclose(cond, model.apply(v, x, t, labels))
    null = model.apply(v, x, t, jnp.full((3,), 10))
    guided = guided_denoiser(model, v, labels, 3.0)(x, t)
    np.testing.assert_allclose(guided, null + 3.0 * (cond - null), atol=1e-5)

    oms = DiffusionUNet(**TINY, time_conditioning=False, train_timesteps="terminal")
    ov = jit(oms.init, static_argnums=2)(jax.random.key(3), x, None, labels)
    ov = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), ov)
    key = jax.random.key(11)
    got = generate(model, v, labels, key, num_steps=3, guidance_scale=2.0,
                   oms=(oms, ov, labels, 1.5))  # fmt: skip
    # The same by hand: OMS's guided v at x_T, the bridge to the first timestep, the sampler.
    k_x, k_oms, k_s = jax.random.split(key, 3)
    x_T = jax.random.normal(k_x, x.shape)
    ab, ts = schedule_of(model), inference_timesteps(50, 3)
    x_start = oms_step(guided_denoiser(oms, ov, labels, 1.5)(x_T, None), x_T, ab[ts[0]], k_oms)
    want = sample(guided_denoiser(model, v, labels, 2.0), x_start, ab, ts, key=k_s)
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = generate(model, v, labels, key, num_steps=3, guidance_scale=2.0)
    assert plain.shape == x.shape and np.abs(plain - got).max() > 1e-3


def test_bad_inputs(base):
    model, v = base
    x = _images()
    with pytest.raises(ValueError, match="x must be packed"):
        model.apply(v, x)  # one channel: not the packed form
    with pytest.raises(ValueError, match="x must be x_t"):
        model.apply(v, pack_labels(x, jnp.arange(3)), jnp.arange(3), jnp.arange(3))
    with pytest.raises(ValueError, match="label must be"):
        model.apply(v, x, jnp.arange(3), jnp.arange(2))
    with pytest.raises(ValueError, match="t must be"):
        model.apply(v, x, None, jnp.arange(3))
    with pytest.raises(ValueError, match="num_groups"):
        DiffusionUNetConfig(widths=(6, 16), num_groups=4)
    with pytest.raises(ValueError, match="epsilon"):
        DiffusionUNetConfig(prediction="epsilon")
    with pytest.raises(ValueError, match="train_timesteps='terminal'"):
        DiffusionUNetConfig(time_conditioning=False)
    with pytest.raises(ValueError, match="image_size"):
        DiffusionUNetConfig(image_size=6, widths=(8, 16, 32), num_groups=4)
