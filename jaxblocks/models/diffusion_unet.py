"""A small label-conditioned diffusion UNet, its training objective, and One More Step's module.

`DiffusionUNet` is the DDPM UNet (Ho et al., https://arxiv.org/abs/2006.11239) at small scale:
ResNet blocks (GroupNorm → SiLU → 3×3 conv, twice) with the timestep and class embedding added
between the convolutions, strided-conv downsampling, nearest-neighbour upsampling, skip
connections from every down block, and multi-head self-attention at the lowest resolution. The
class embedding has one extra row, the null label ``num_classes``, so one network serves
classifier-free guidance (Ho & Salimans, https://arxiv.org/abs/2207.12598).

One More Step (Hu et al., CVPR 2024, https://arxiv.org/abs/2311.15744, official code
mhh0318/OneMoreStep) is the same class without timestep conditioning (``time_conditioning=False``,
as the official ``UNet2DConditionWoCTModel``), trained only at the zero-terminal-SNR step
(``train_timesteps="terminal"``) to predict v = −x₀ from pure noise; `generate` applies it once
with its own guidance, bridges to the frozen model's first timestep with
`jaxblocks.layers.diffusion.oms_step`, and lets the frozen sampler continue unchanged.

The trainer feeds a model one array, so the module has two call forms: ``model(x_t, t, label)``
is the denoiser; ``model(packed)``, with the label packed as an extra channel (`pack_labels`), is
the training objective (it draws t, the noise and the label dropout itself and returns the
prediction stacked with its target; the ``diffusion`` task scores their squared difference).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxblocks.layers.diffusion import (
    BETA_SCHEDULES,
    PREDICTIONS,
    cfg_combine,
    inference_timesteps,
    make_alphas_cumprod,
    oms_step,
    prediction_target,
    q_sample,
    sample,
)
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = [
    "DIFFUSION_UNET_PRESETS",
    "DiffusionUNet",
    "DiffusionUNetConfig",
    "generate",
    "guided_denoiser",
    "pack_labels",
    "schedule_of",
    "timestep_embedding",
]

TRAIN_TIMESTEPS = ("uniform", "terminal")
# Key of the objective's noise when no "dropout" rng is given (evaluation, init): a fixed draw
# makes the test loss deterministic and comparable between evaluations.
EVAL_NOISE_SEED = 0


@dataclasses.dataclass(frozen=True)
class DiffusionUNetConfig:
    """Architecture and training objective of a `DiffusionUNet`.

    Attributes:
      image_size: side of the square images (divisible by ``2 ** (len(widths) - 1)``).
      channels: image channels.
      num_classes: class labels ``0 .. num_classes-1``; ``num_classes`` itself is the null label.
      widths: channels per resolution level (one strided-conv halving between levels).
      blocks_per_level: ResNet blocks per level on the way down (one more on the way up).
      num_groups: GroupNorm groups (must divide every width).
      num_heads: heads of the self-attention at the lowest resolution.
      time_conditioning: add the timestep embedding (False: OMS's time-free module).
      num_timesteps, beta_schedule, beta_start, beta_end, zero_terminal_snr: the noise schedule
        (`jaxblocks.layers.diffusion.make_alphas_cumprod`) of the objective and of sampling.
      prediction: what the network outputs, ``"v"``, ``"epsilon"`` or ``"sample"``.
      label_dropout: probability of replacing the label by the null label in training (CFG).
      train_timesteps: ``"uniform"`` over ``0 .. T-1`` or ``"terminal"`` (t = T-1 only: OMS).
    """

    image_size: int = 8
    channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    blocks_per_level: int = 1
    num_groups: int = 8
    num_heads: int = 4
    time_conditioning: bool = True
    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    prediction: str = "v"
    label_dropout: float = 0.1
    train_timesteps: str = "uniform"

    def __post_init__(self):
        _validate(self)


def _validate(c: Any) -> None:
    name = type(c).__name__
    widths = tuple(c.widths)
    for f in ("image_size", "channels", "num_classes", "blocks_per_level", "num_groups",
              "num_heads", "num_timesteps"):  # fmt: skip
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {f}={v!r} must be a positive int")
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name}: widths={widths!r} must be positive ints")
    if any(w % c.num_groups for w in widths):
        raise ValueError(f"{name}: num_groups={c.num_groups} must divide every width {widths}")
    if widths[-1] % c.num_heads:
        raise ValueError(f"{name}: num_heads={c.num_heads} must divide the lowest-resolution "
                         f"width {widths[-1]}")  # fmt: skip
    if c.image_size % 2 ** (len(widths) - 1):
        raise ValueError(f"{name}: image_size={c.image_size} must be divisible by "
                         f"{2 ** (len(widths) - 1)} ({len(widths)} levels)")  # fmt: skip
    if c.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{name}: beta_schedule must be one of {BETA_SCHEDULES}, got "
                         f"{c.beta_schedule!r}")  # fmt: skip
    if c.prediction not in PREDICTIONS:
        raise ValueError(f"{name}: prediction must be one of {PREDICTIONS}, got "
                         f"{c.prediction!r}")  # fmt: skip
    if c.prediction == "epsilon" and c.zero_terminal_snr:
        raise ValueError(f"{name}: epsilon-prediction cannot reach x0 at zero terminal SNR "
                         "(Lin et al. §3.2); use prediction='v'")  # fmt: skip
    if not 0.0 <= c.label_dropout < 1.0:
        raise ValueError(f"{name}: label_dropout={c.label_dropout!r} must be in [0, 1)")
    if c.train_timesteps not in TRAIN_TIMESTEPS:
        raise ValueError(f"{name}: train_timesteps must be one of {TRAIN_TIMESTEPS}, got "
                         f"{c.train_timesteps!r}")  # fmt: skip
    if not c.time_conditioning and c.train_timesteps != "terminal":
        raise ValueError(f"{name}: a model without time_conditioning sees one timestep only; "
                         "set train_timesteps='terminal'")  # fmt: skip


def schedule_of(model: Any) -> np.ndarray:
    """ᾱ_t (float64 ``[T]``) of a `DiffusionUNet` or `DiffusionUNetConfig`."""
    m = model
    return make_alphas_cumprod(m.beta_schedule, m.num_timesteps, m.beta_start, m.beta_end,
                               zero_terminal_snr=m.zero_terminal_snr)  # fmt: skip


def pack_labels(images: Float[Array, "B H W C"], labels: Int[Array, " B"]) -> Array:
    """The objective's input: ``images`` with the label as one more constant channel (numpy in,
    numpy out; jax arrays in, jax out)."""
    xp = np if isinstance(images, np.ndarray) else jnp
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"pack_labels: images must be [B, H, W, C] and labels [B], got "
                         f"{images.shape} and {labels.shape}")  # fmt: skip
    plane = xp.broadcast_to(labels.astype(images.dtype)[:, None, None, None],
                            images.shape[:3] + (1,))  # fmt: skip
    return xp.concatenate([images, plane], axis=-1)


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Sinusoidal embedding ``[cos(t·f_k), sin(t·f_k)]`` of ``t`` ``[B]`` (fp32 ``[B, dim]``),
    frequencies ``f_k = max_period^(−k/(dim/2))`` (DDPM's, in diffusers' cos-first order)."""
    if dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, dim/2]
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + Dense(emb), GroupNorm → SiLU → conv (zero-init), + skip."""

    features: int
    num_groups: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(nn.GroupNorm(self.num_groups, name="norm1", **kw)(x))
        h = nn.Conv(self.features, (3, 3), name="conv1", **kw)(h)
        e = nn.Dense(self.features, name="emb_proj", **kw)(nn.silu(emb))  # [B, F]
        h = h + e[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.num_groups, name="norm2", **kw)(h))
        h = nn.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros, name="conv2",
                    **kw)(h)  # fmt: skip
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), name="skip", **kw)(x)
        return x + h


class _AttnBlock(nn.Module):
    """GroupNorm → multi-head self-attention over the H·W positions (zero-init output) + x."""

    num_heads: int
    num_groups: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.GroupNorm(self.num_groups, name="norm", **kw)(x).reshape(b, h * w, c)
        # flax's attention (no positions: the convolutions carry them, as in DDPM's UNet); the
        # project's `SelfAttention` adds rotary positions meant for token sequences.
        y = nn.MultiHeadDotProductAttention(
            self.num_heads, out_kernel_init=nn.initializers.zeros, name="attn", **kw
        )(y)  # [B, HW, C]
        return x + y.reshape(b, h, w, c)


class DiffusionUNet(nn.Module):
    """Label-conditioned diffusion UNet (DDPM, https://arxiv.org/abs/2006.11239) with a null
    label for classifier-free guidance; also One More Step's time-free module
    (https://arxiv.org/abs/2311.15744) with ``time_conditioning=False``.

    Two call forms:

    * ``model(x_t, t, label)``: the network output (v, ε or x₀ per ``prediction``) ``[B, H, W,
      C]`` for noisy images ``x_t``, int timesteps ``t`` ``[B]`` (None allowed without time
      conditioning) and labels ``[B]`` in ``0 .. num_classes`` (``num_classes`` = null).
    * ``model(packed, train=...)``: the training objective on clean images in [-1, 1] with their
      labels as one more channel (`pack_labels`): t drawn per ``train_timesteps``, ε ~ N(0, I),
      the label replaced by the null label with probability ``label_dropout`` in training; returns
      ``[B, H, W, C, 2]``, the prediction and its target (`prediction_target`) stacked. The draws
      use the ``"dropout"`` rng (the trainer's step key); without it a fixed key
      (`EVAL_NOISE_SEED`), so evaluation losses are deterministic.

    Attributes:
      see `DiffusionUNetConfig`; dtype: compute dtype (None: the input's, integers promoted to
      float32); param_dtype: parameter storage dtype.

    Example:
      >>> model = DiffusionUNet(widths=(8, 16), num_groups=4, num_heads=2)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
      >>> t, y = jnp.array([10, 900]), jnp.array([3, 10])
      >>> v = model.init(jax.random.key(1), x, t, y)
      >>> model.apply(v, x, t, y).shape
      (2, 8, 8, 1)
    """

    image_size: int = 8
    channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    blocks_per_level: int = 1
    num_groups: int = 8
    num_heads: int = 4
    time_conditioning: bool = True
    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    prediction: str = "v"
    label_dropout: float = 0.1
    train_timesteps: str = "uniform"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # Build from a `DiffusionUNetConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        t: Int[Array, " B"] | None = None,
        label: Int[Array, " B"] | None = None,
        *,
        train: bool = False,
    ) -> Array:
        _validate(self)
        objective = label is None
        s, c = self.image_size, self.channels
        want_c = c + 1 if objective else c
        if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, want_c):
            what = "packed images+label [B, H, W, C+1]" if objective else "x_t [B, H, W, C]"
            raise ValueError(f"DiffusionUNet: x must be {what} = [B, {s}, {s}, {want_c}], got "
                             f"shape {x.shape}")  # fmt: skip
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        b = x.shape[0]
        if objective:
            if t is not None:
                raise ValueError("DiffusionUNet: t without label; pass both (denoiser) or "
                                 "neither (objective on packed images)")  # fmt: skip
            x0 = x[..., :c].astype(jnp.float32)
            label = jnp.round(x[:, 0, 0, c].astype(jnp.float32)).astype(jnp.int32)
            key = self.make_rng("dropout") if self.has_rng("dropout") else None
            if key is None:
                key = jax.random.key(EVAL_NOISE_SEED)
            k_t, k_eps, k_drop = jax.random.split(key, 3)
            last = self.num_timesteps - 1
            if self.train_timesteps == "terminal":
                t = jnp.full((b,), last, jnp.int32)
            else:
                t = jax.random.randint(k_t, (b,), 0, self.num_timesteps, jnp.int32)
            if train and self.label_dropout > 0:
                drop = jax.random.bernoulli(k_drop, self.label_dropout, (b,))
                label = jnp.where(drop, self.num_classes, label)
            eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
            ab = jnp.asarray(schedule_of(self), jnp.float32)[t]  # [B]
            target = prediction_target(x0, eps, ab, self.prediction)
            x = q_sample(x0, eps, ab)
        else:
            if label.shape != (b,):
                raise ValueError(f"DiffusionUNet: label must be [B] = [{b}], got {label.shape}")
            if self.time_conditioning and (t is None or jnp.shape(t) != (b,)):
                raise ValueError(f"DiffusionUNet: t must be [B] = [{b}] timesteps, got "
                                 f"{None if t is None else jnp.shape(t)}")  # fmt: skip
        out = self._network(x.astype(dtype), t, label, dtype)
        if objective:
            return jnp.stack([out, target.astype(dtype)], axis=-1)
        return out

    def _network(self, x: Array, t: Array | None, label: Array, dtype: Any) -> Array:
        widths = tuple(self.widths)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        g = self.num_groups
        emb_dim = 4 * widths[0]
        emb = nn.Embed(self.num_classes + 1, emb_dim, name="label_embed", **kw)(label)
        if self.time_conditioning:
            te = timestep_embedding(t, widths[0]).astype(dtype)
            te = nn.Dense(emb_dim, name="time_mlp_0", **kw)(te)
            te = nn.Dense(emb_dim, name="time_mlp_1", **kw)(nn.silu(te))
            emb = emb + te  # [B, E]

        h = nn.Conv(widths[0], (3, 3), name="conv_in", **kw)(x)
        skips = [h]
        for i, w in enumerate(widths):
            for j in range(self.blocks_per_level):
                h = _ResBlock(w, g, name=f"down_{i}_{j}", **kw)(h, emb)
                skips.append(h)
            if i < len(widths) - 1:
                h = nn.Conv(w, (3, 3), strides=(2, 2), name=f"downsample_{i}", **kw)(h)
                skips.append(h)
        h = _ResBlock(widths[-1], g, name="mid_0", **kw)(h, emb)
        h = _AttnBlock(self.num_heads, g, name="mid_attn", **kw)(h)
        h = _ResBlock(widths[-1], g, name="mid_1", **kw)(h, emb)
        for i in reversed(range(len(widths))):
            for j in range(self.blocks_per_level + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = _ResBlock(widths[i], g, name=f"up_{i}_{j}", **kw)(h, emb)
            if i > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest ×2
                h = nn.Conv(widths[i], (3, 3), name=f"upsample_{i}", **kw)(h)
        h = nn.silu(nn.GroupNorm(g, name="norm_out", **kw)(h))
        # Default init (DDPM zero-initialises this conv too): a zero output at init would make
        # every gradient of a loss on the output alone vanish (the registry's check).
        return nn.Conv(self.channels, (3, 3), name="conv_out", **kw)(h)


# --- sampling -------------------------------------------------------------------------------


def guided_denoiser(model: DiffusionUNet, variables: Any, labels: Array, guidance_scale: float):
    """``denoise(x_t, t)`` for `jaxblocks.layers.diffusion.sample`: the model's output for
    ``labels``, guided (`cfg_combine`) against the null label unless ``guidance_scale == 1``."""
    null = jnp.full_like(labels, model.num_classes)

    def denoise(x: Array, t: Array) -> Array:
        if guidance_scale == 1.0:
            return model.apply(variables, x, t, labels)
        tt = None if t is None else jnp.concatenate([t, t])
        both = model.apply(variables, jnp.concatenate([x, x]), tt, jnp.concatenate([null, labels]))
        uncond, cond = jnp.split(both, 2)
        return cfg_combine(uncond, cond, guidance_scale)

    return denoise


def generate(
    model: DiffusionUNet,
    variables: Any,
    labels: Int[Array, " B"],
    key: PRNGKeyArray,
    *,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    spacing: str = "trailing",
    oms: tuple[DiffusionUNet, Any, Array, float] | None = None,
) -> Array:
    """Samples ``[B, H, W, C]`` for ``labels`` from ``model`` (DDIM with ``eta``, ``num_steps``
    steps of ``spacing``, classifier-free guidance ``guidance_scale``).

    ``oms=(oms_model, oms_variables, oms_labels, oms_guidance_scale)`` applies One More Step
    first: the time-free OMS module predicts v from x_T ~ N(0, I) for ``oms_labels`` (which may
    differ from ``labels``: low-frequency control), guided against its null label, and
    `oms_step` carries x_T to the frozen ``model``'s first timestep, from which the frozen
    sampler runs unchanged. Without ``oms`` the sampler starts from x_T ~ N(0, I) directly, as
    a non-zero-terminal-SNR model's pipeline does.
    """
    ab = schedule_of(model)
    ts = inference_timesteps(model.num_timesteps, num_steps, spacing)
    shape = (labels.shape[0], model.image_size, model.image_size, model.channels)
    k_x, k_oms, k_s = jax.random.split(key, 3)
    x = jax.random.normal(k_x, shape, jnp.float32)
    if oms is not None:
        oms_model, oms_vars, oms_labels, oms_scale = oms
        if oms_model.prediction != "v" or oms_model.time_conditioning:
            raise ValueError("generate: oms must be a time-free v-prediction DiffusionUNet")
        v = guided_denoiser(oms_model, oms_vars, oms_labels, oms_scale)(x, None)
        x = oms_step(v, x, float(ab[ts[0]]), k_oms)
    denoise = guided_denoiser(model, variables, labels, guidance_scale)
    return sample(denoise, x, ab, ts, key=k_s, prediction=model.prediction, eta=eta)


# --- presets ------------------------------------------------------------------------------------

DIFFUSION_UNET_PRESETS: dict[str, DiffusionUNetConfig] = {
    # 8×8 scikit-learn digits, 10 classes + null, v-prediction on SD's schedule rescaled to zero
    # terminal SNR (Lin et al.).
    "diffusion_unet_digits": DiffusionUNetConfig(),
    # OMS module for it: a smaller time-free UNet trained at the zero-SNR step only.
    "oms_unet_digits": DiffusionUNetConfig(
        widths=(16, 32), time_conditioning=False, train_timesteps="terminal"
    ),
}


def _example(config: DiffusionUNetConfig) -> Array:
    s, c = config.image_size, config.channels
    x = jnp.sin(jnp.arange(2 * s * s * c, dtype=jnp.float32) * 0.37).reshape(2, s, s, c)
    return pack_labels(x, jnp.array([0, config.num_classes - 1], jnp.int32))


register_presets(
    DiffusionUNet.from_config,
    DIFFUSION_UNET_PRESETS,
    example_input=_example,
    doc="{name}: label-conditioned diffusion UNet on 8×8 digits (called on packed images it "
    "returns the training objective's prediction and target); kwargs override fields.",
    paper=Paper(
        "One More Step: A Versatile Plug-and-Play Module for Rectifying Diffusion Schedule "
        "Flaws and Enhancing Low-Frequency Controls",
        arxiv="2311.15744",
        code="https://github.com/mhh0318/OneMoreStep",
    ),
    params_source="no published count; the project's small 8×8 digits models (the paper's "
    "OMS modules are SD-sized)",
    tiny={"widths": (8, 16), "num_groups": 4, "num_heads": 2},
)
