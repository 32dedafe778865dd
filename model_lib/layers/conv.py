"""A dense, strided 1-D convolution over a sequence (Whisper's audio stem; Mamba's causal depthwise conv is
`ssm.Conv1d`).

The kernel is stored `[K, C_in, C_out]`: the reverse of torch's `nn.Conv1d.weight [C_out, C_in, K]`, so the
loaders' and exporters' `.T` of a `.kernel` converts both ways, as it does for a linear `weight [out, in]`.

Glossary: B batch, T steps, K taps, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Conv1d(nnx.Module):
    """`y[t] = bias + sum_k x[t * stride + k - padding] @ kernel[k]`, zeros outside the sequence."""

    def __init__(self, in_channels: int, out_channels: int, width: int, *, stride: int = 1, padding: int = 0,
                 axes: tuple[str | None, str | None], dtype: jnp.dtype, init_std: float, rngs: nnx.Rngs):
        self.stride, self.padding = stride, padding
        init = jax.nn.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), (width, in_channels, out_channels), dtype),
                                logical_axes=(None, *axes))
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype), logical_axes=axes[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [B, T, C_in]` -> `[B, (T + 2 * padding - K) // stride + 1, C_out]`."""
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), window_strides=(self.stride,),
                                         padding=[(self.padding, self.padding)],
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(x.dtype)
