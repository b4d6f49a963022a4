"""Fast pure-JAX `causal_conv1d`: one grouped ``conv_general_dilated``, autodiff by XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d_xla(x, w, bias=None, activation=None, *, precision=jax.lax.Precision.HIGHEST):
    """Depthwise causal conv as one grouped ``conv_general_dilated`` (channels last).

    ``precision`` (a `jax.lax.Precision`) is the convolution's: `HIGHEST` (the api's "highest")
    is fp32 on every backend; `DEFAULT` ("tf32") lets a GPU use TF32 and a TPU one bf16 pass.
    """
    W, C = w.shape
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32),  # [B, T, C]
        w.astype(jnp.float32)[:, None, :],  # [W, 1, C]  (W, I/g, O)
        window_strides=(1,),
        padding=((W - 1, 0),),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=C,
        precision=precision,
    )
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, None, :]
    if activation == "silu":
        y = jax.nn.silu(y)
    return y.astype(x.dtype)
