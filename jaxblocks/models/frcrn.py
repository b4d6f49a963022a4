"""FRCRN — Zhao et al., "FRCRN: Boosting Feature Representation using Frequency Recurrence for
Monaural Speech Enhancement", ICASSP 2022, https://arxiv.org/abs/2206.07293 (official code:
modelscope/ClearerVoice-Studio ``clearvoice/models/frcrn_se/frcrn.py``, class ``DCCRN`` as
``FRCRN_SE_16K`` builds it; original in modelscope ``models/audio/ans/frcrn.py``).

A complex-ratio-mask speech enhancer: a fixed-kernel STFT (`ConvSTFT`, sqrt-Hann, 640/320/640
at 16 kHz) → two stacked complex U-Nets (`FRCRNUNet`; the second takes the first's raw
output) → the complex ideal ratio mask ``M = tanh(u₂) + tanh(u₁)`` (tanh on the real and the
imaginary parts separately, so each part of ``M`` lies in ``(−2, 2)``) → ``Ŝ = M·X`` (complex
product) → `ConviSTFT`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxblocks.blocks.frcrn import FRCRNUNet, unet_frequency_sizes
from jaxblocks.layers.complex_nn import WINDOWS, complex_multiply, conv_istft, conv_stft
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["FRCRN", "FRCRNConfig", "FRCRN_PRESETS", "frcrn_variables_from_torch"]


@dataclasses.dataclass(frozen=True)
class FRCRNConfig:
    """Architecture of an `FRCRN`; the default is the official ``FRCRN_SE_16K``
    (``DCCRN(complex=True, model_complexity=45, model_depth=14, win_len=640, win_inc=320,
    fft_len=640, win_type='hanning')``; ``model_complexity`` is unused at depth 14).

    Attributes:
      win_len, hop_len, fft_len: STFT (640, 320, 640 samples at 16 kHz).
      window: ``'hann'`` (square-rooted periodic Hann; official ``'hanning'``).
      channels: U-Net width (128).
      num_levels: encoder/decoder pairs per U-Net (7 = ``model_depth // 2``).
      num_unets: stacked U-Nets (2); the mask sums their tanh outputs.
      fsmn_hidden: FSMN hidden width (128).
      lorder: FSMN memory taps (20).
      se_reduction: SE squeeze ratio (8).
      official_unused: create the official U-Net's four never-called modules (see
        `jaxblocks.blocks.frcrn`) so the parameter tree matches the checkpoints.
    """

    win_len: int = 640
    hop_len: int = 320
    fft_len: int = 640
    window: str | None = "hann"
    channels: int = 128
    num_levels: int = 7
    num_unets: int = 2
    fsmn_hidden: int = 128
    lorder: int = 20
    se_reduction: int = 8
    official_unused: bool = True

    def __post_init__(self):
        for f in ("win_len", "hop_len", "fft_len", "channels", "num_levels", "num_unets",
                  "fsmn_hidden", "lorder", "se_reduction"):  # fmt: skip
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FRCRNConfig.{f} must be an int >= 1, got {v!r}")
        if self.win_len > self.fft_len or self.hop_len > self.win_len:
            raise ValueError(f"FRCRNConfig: need hop_len <= win_len <= fft_len, got "
                             f"{self.hop_len}, {self.win_len}, {self.fft_len}")  # fmt: skip
        if self.window is not None and self.window not in WINDOWS:
            raise ValueError(f"FRCRNConfig.window must be one of {WINDOWS} or None, got "
                             f"{self.window!r}")  # fmt: skip
        if self.channels // self.se_reduction < 1:
            raise ValueError(f"FRCRNConfig: channels {self.channels} // se_reduction "
                             f"{self.se_reduction} must be >= 1")  # fmt: skip
        unet_frequency_sizes(self.fft_len // 2 + 1, self.num_levels)  # raises if too deep


class FRCRN(nn.Module):
    """FRCRN speech enhancer (https://arxiv.org/abs/2206.07293): noisy waveforms ``[B, L]`` →
    enhanced waveforms ``[B, L]``.

    STFT → ``num_unets`` stacked complex U-Nets → bounded cIRM ``Σ tanh(u_k)`` → masked
    spectrum → iSTFT, as the official ``DCCRN.forward``. The official output has ``(T − 1)·hop
    + win`` samples (``T`` frames, no padding); it is zero-padded back to ``L`` here. The fixed
    STFT/iSTFT run in fp32 whatever ``dtype``. Parameters use Flax's initialisers, not torch's;
    BatchNorm follows Flax semantics (see `ComplexBatchNorm`).

    Attributes:
      win_len ... official_unused: see `FRCRNConfig`.
      dtype: compute dtype of the U-Nets (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> model = FRCRN(win_len=64, hop_len=32, fft_len=64, channels=8, num_levels=3,
      ...               fsmn_hidden=8, lorder=3, se_reduction=4)
      >>> noisy = jnp.sin(0.05 * jnp.arange(512.0))[None]
      >>> model.apply(model.init(jax.random.key(0), noisy), noisy).shape
      (1, 512)
    """

    win_len: int = 640
    hop_len: int = 320
    fft_len: int = 640
    window: str | None = "hann"
    channels: int = 128
    num_levels: int = 7
    num_unets: int = 2
    fsmn_hidden: int = 128
    lorder: int = 20
    se_reduction: int = 8
    official_unused: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, noisy: Float[Array, "B L"], train: bool = False, return_mask: bool = False
    ) -> Float[Array, "B L"] | tuple[Array, Array]:
        """Enhanced waveforms ``[B, L]``; with ``return_mask`` also the complex mask ``[B, F, T,
        2]`` (each part in ``(−num_unets, num_unets)``)."""
        cfg = FRCRNConfig(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(FRCRNConfig)})  # fmt: skip
        if noisy.ndim != 2:
            raise ValueError(f"FRCRN: noisy must be [B, L] waveforms, got shape {noisy.shape}")
        if noisy.shape[1] < cfg.win_len:
            raise ValueError(f"FRCRN: noisy must have at least win_len = {cfg.win_len} samples, "
                             f"got {noisy.shape[1]}")  # fmt: skip
        dtype = self.dtype
        if dtype is None:
            dtype = noisy.dtype if jnp.issubdtype(noisy.dtype, jnp.floating) else jnp.float32
        stft = (cfg.win_len, cfg.hop_len, cfg.fft_len, cfg.window)
        spec = conv_stft(noisy, *stft)  # [B, F, T, 2], fp32
        u = spec[:, :, :, None, :].astype(dtype)  # [B, F, T, 1, 2]
        mask = jnp.zeros(spec.shape, jnp.float32)
        for k in range(cfg.num_unets):
            name = "unet" if k == 0 else f"unet{k + 1}"  # official unet, unet2
            u = FRCRNUNet(
                cfg.channels, cfg.num_levels, fsmn_hidden=cfg.fsmn_hidden, lorder=cfg.lorder,
                se_reduction=cfg.se_reduction, official_unused=cfg.official_unused,
                dtype=dtype, param_dtype=self.param_dtype, name=name,
            )(u, train)  # fmt: skip
            mask = mask + jnp.tanh(u[:, :, :, 0].astype(jnp.float32))
        est = conv_istft(complex_multiply(spec, mask), *stft)  # [B, (T − 1)·hop + win]
        length = noisy.shape[1]
        est = jnp.pad(est, ((0, 0), (0, length - est.shape[1]))).astype(dtype)
        return (est, mask.astype(dtype)) if return_mask else est


_TORCH_RENAMES = (
    (r"^(encoder\d+)\.conv\.", r"\1_conv/"),
    (r"^(encoder\d+|decoder\d+)\.bn\.", r"\1_bn/"),
    (r"^(decoder\d+)\.transconv\.(tconv_re|tconv_im)\.(weight|bias)$", r"\1_transconv/\2_\3"),
    (r"^(fsmn_(?:enc|dec)\d+)\.(fsmn_re|fsmn_im)_L1\.", r"\1/\2/"),
    (r"^fsmn\.(fsmn_re|fsmn_im)_L(\d)\.", r"fsmn/\1_l\2/"),
    (r"^(se_layer_(?:enc|dec)\d+)\.(fc_r|fc_i)\.(\d)\.", r"\1/\2_\3/"),
    (r"\.", "/"),
)


def frcrn_variables_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Flax variables ``{"params", "batch_stats"}`` of an `FRCRN` from an official torch
    ``DCCRN`` state dict (``unet.*``, ``unet2.*``; ``model.`` / ``module.`` prefixes are
    stripped; the fixed ``stft`` / ``istft`` kernels and the duplicate ``encoders.N`` …
    ModuleList entries are skipped). Build the model with
    ``official_unused=True`` (the default) so the trees match.

    Conv kernels ``[out, in, kh, kw]`` → ``[kh, kw, in, out]``; transposed-conv kernels
    ``[in, out, kh, kw]`` → ``[kh, kw, in, out]``; Linear weights transposed; FSMN ``conv1``
    ``[C, 1, lorder, 1]`` → ``memory [lorder, C]``; BN ``weight``/``running_mean``/``running_var``
    → ``scale``/``mean``/``var``.
    """
    params: dict = {}
    stats: dict = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(model\.|module\.)+", "", key)
        if not key.startswith(("unet.", "unet2.")) or key.endswith("num_batches_tracked"):
            continue
        w = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        top, rest = key.split(".", 1)
        if re.match(r"(encoders|decoders|se_layers_enc|se_layers_dec|fsmn_enc|fsmn_dec)\.\d", rest):
            continue  # the official ModuleLists repeat the modules registered by name
        leaf_is = rest.rsplit(".", 1)[-1]
        for pat, rep in _TORCH_RENAMES:
            rest = re.sub(pat, rep, rest)
        path = rest.split("/")
        tree = params
        if leaf_is in ("running_mean", "running_var"):
            tree, path[-1] = stats, {"running_mean": "mean", "running_var": "var"}[leaf_is]
        elif path[-1].endswith("weight"):
            if "transconv" in path[0]:
                w = w.transpose(2, 3, 0, 1)
            elif path[-2] == "conv1":
                path, w = path[:-2] + ["memory"], w[:, 0, :, 0].T
            elif w.ndim == 4:
                w = w.transpose(2, 3, 1, 0)
            elif "_bn" in path[0]:
                pass
            else:
                w = w.T
            path[-1] = path[-1].replace("weight", "kernel")
            if "_bn" in path[0]:
                path[-1] = "scale"
        node = tree.setdefault(top, {})
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = w
    return {"params": params, "batch_stats": stats}


FRCRN_PRESETS: dict[str, FRCRNConfig] = {
    "frcrn": FRCRNConfig(),
    # The denoising demo's CPU model (8 kHz, 16 ms windows, 8 ms hop; four levels).
    "frcrn_tiny": FRCRNConfig(
        win_len=128,
        hop_len=64,
        fft_len=128,
        channels=16,
        num_levels=4,
        fsmn_hidden=16,
        lorder=8,
        se_reduction=4,
        official_unused=False,
    ),  # fmt: skip
}


def _example_noisy(config: FRCRNConfig) -> Array:
    t = np.arange(max(4 * config.win_len, 512), dtype=np.float32)
    return jnp.asarray((np.sin(0.07 * t) + 0.3 * np.sin(1.31 * t + 1.0))[None])


register_presets(
    FRCRN.from_config,
    FRCRN_PRESETS,
    example_input=_example_noisy,
    doc="{name}: FRCRN speech-enhancement preset; kwargs override config fields.",
    paper=Paper(
        "FRCRN: Boosting Feature Representation using Frequency Recurrence for Monaural Speech "
        "Enhancement",
        arxiv="2206.07293",
        code="https://github.com/modelscope/ClearerVoice-Studio",
    ),
    published_params={"frcrn": 13_141_844},
    params_source="the official ClearerVoice-Studio FRCRN_SE_16K (DCCRN, model_depth 14, "
    "640/320/640) instantiated in torch: 13,141,844 trainable parameters (6,570,922 per U-Net, "
    "including the 158,784 of the four modules the official UNet defines but never calls); "
    "torch's parameters() totals 13,963,604 with the 821,760 fixed (requires_grad=False) "
    "ConvSTFT/ConviSTFT kernels, constants here. frcrn_tiny: no published count (this "
    "project's CPU demo size)",
    tiny={
        "win_len": 64,
        "hop_len": 32,
        "fft_len": 64,
        "channels": 8,
        "num_levels": 3,
        "fsmn_hidden": 8,
        "lorder": 3,
        "se_reduction": 4,
    },  # fmt: skip
)
