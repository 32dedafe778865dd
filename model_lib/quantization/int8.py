"""Weight-only int8 (`quantization="int8"`): int8 values and one float32 scale per output channel.

Each output channel of a `[in, out]` kernel keeps int8 values and absmax / 127 as its scale
(symmetric, round to nearest). The matmul runs on the int8 values and scales the output
columns, `(x @ q) * scale`, which is `x @ (q * scale)` without materialising the float kernel
(`pallas_kernels.quantized_matmul.int8_matmul`: a fused Pallas kernel on GPU, jnp elsewhere).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model_lib.quantization.base import QuantizedWeight, QuantState, on_device, storage_meta
from pallas_kernels.quantized_matmul import int8_matmul


class Int8Weight(QuantizedWeight):
    """The weight-only int8 form of one `[in, out]` kernel."""

    def __init__(self, values: Any, scale: Any, *, axes: Sequence[str | None] | None = None, head_size: int = 1):
        self.values = QuantState(on_device(values), **storage_meta(axes, head_size, ("in", "out")))  # [in, out] int8
        self.scale = QuantState(on_device(scale), **storage_meta(axes, head_size, ("out",)))  # [out] float32
        self.shape = tuple(values.shape)

    def matmul(self, x: jax.Array) -> jax.Array:
        return int8_matmul(x, self.values[...], self.scale[...])

    def dequantize(self, dtype: Any) -> jax.Array:
        return dequantize_int8(self, dtype)


def quantize_int8(weight: np.ndarray, *, axes: Sequence[str | None] | None = None, head_size: int = 1) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float `[in, out]` kernel (host side); `axes`: the kernel's."""
    w = np.asarray(weight, np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    values = np.clip(np.round(w / np.where(scale == 0, 1.0, scale)), -127, 127).astype(np.int8)
    return Int8Weight(values, scale.astype(np.float32), axes=axes, head_size=head_size)


def dequantize_int8(q: Int8Weight, dtype: Any) -> jax.Array:
    """`[in, out]` weight in `dtype` (the published layout's meaning: values * scale per column)."""
    return (q.values[...].astype(jnp.float32) * q.scale[...]).astype(dtype)
