"""Weight quantization: NF4 with double quantization (QLoRA / bitsandbytes) and weight-only int8.

Int8 (`quantization="int8"`, vLLM's name for it is a weight-only int8 scheme): each output
channel of a `[in, out]` kernel keeps int8 values and one float32 scale, absmax / 127
(symmetric, round to nearest). The matmul runs on the int8 values and scales the output
columns, `(x @ q) * scale`, which is `x @ (q * scale)` without materialising the float kernel.

NF4:

A weight is flattened and cut into blocks of 64 values; each block stores
4-bit indices into the 16-value NormalFloat code (two per byte) and its absmax.
The absmax constants are quantized again ("double quantization"): their mean is
subtracted and they are stored as int8 in blocks of 256 with one float32 scale
per block (QLoRA uses 8-bit floats here; int8 with a per-block scale keeps the
same 0.127 -> ~0.5 bit/parameter overhead saving and dequantizes with one
multiply). Dequantization is pure jnp and runs inside the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCK = 64
ABSMAX_BLOCK = 256

# The 16 NormalFloat-4 levels: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, appendix E).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)


class QuantState(nnx.Variable):
    """Frozen quantized storage (never trained, never cast)."""


class NF4Weight(nnx.Module):
    """The NF4 form of one `[in, out]` kernel."""

    def __init__(self, packed: np.ndarray, absmax_q: np.ndarray, absmax_scale: np.ndarray, offset: float, shape: tuple[int, int]):
        self.packed = QuantState(jnp.asarray(packed))  # [n / 2] uint8: two 4-bit codes per byte
        self.absmax_q = QuantState(jnp.asarray(absmax_q))  # [n / 64] int8
        self.absmax_scale = QuantState(jnp.asarray(absmax_scale))  # [ceil(n / 64 / 256)] float32
        self.offset = QuantState(jnp.asarray(offset, jnp.float32))
        self.shape = tuple(shape)

    def nbytes(self) -> int:
        return sum(int(v.get_value().nbytes) for v in (self.packed, self.absmax_q, self.absmax_scale, self.offset))


def quantize_nf4(weight: np.ndarray) -> NF4Weight:
    """Quantize a float `[in, out]` kernel (host side). Its size must be a multiple of 128."""
    w = np.asarray(weight, np.float32)
    if w.size % (2 * BLOCK):
        raise ValueError(f"NF4 needs a multiple of {2 * BLOCK} values, the weight has {w.size} ({w.shape})")
    blocks = w.reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1)
    normalised = blocks / np.where(absmax == 0, 1.0, absmax)[:, None]
    codes = np.abs(normalised[..., None] - NF4_CODE).argmin(axis=-1).astype(np.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]

    offset = float(absmax.mean())
    centred = absmax - offset
    pad = -len(centred) % ABSMAX_BLOCK
    groups = np.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
    scale = np.abs(groups).max(axis=1) / 127.0
    absmax_q = np.round(groups / np.where(scale == 0, 1.0, scale)[:, None]).astype(np.int8).reshape(-1)[: len(centred)]
    return NF4Weight(packed, absmax_q, scale.astype(np.float32), offset, w.shape)


def dequantize_nf4(q: NF4Weight, dtype: jnp.dtype) -> jax.Array:
    """`[in, out]` weight in `dtype`; traceable (runs inside the jitted step)."""
    packed = q.packed[...]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
    values = jnp.asarray(NF4_CODE)[codes].reshape(-1, BLOCK)
    absmax_q = q.absmax_q[...].astype(jnp.float32)
    num_blocks = absmax_q.shape[0]
    scale = jnp.repeat(q.absmax_scale[...], ABSMAX_BLOCK)[:num_blocks]
    absmax = absmax_q * scale + q.offset[...]
    return (values * absmax[:, None]).reshape(q.shape).astype(dtype)


class Int8Weight(nnx.Module):
    """The weight-only int8 form of one `[in, out]` kernel: int8 values and a float32 scale per output."""

    def __init__(self, values: np.ndarray, scale: np.ndarray):
        self.values = QuantState(jnp.asarray(values))  # [in, out] int8
        self.scale = QuantState(jnp.asarray(scale))  # [out] float32
        self.shape = tuple(values.shape)

    def nbytes(self) -> int:
        return int(self.values.get_value().nbytes + self.scale.get_value().nbytes)


def quantize_int8(weight: np.ndarray) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float `[in, out]` kernel (host side)."""
    w = np.asarray(weight, np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    values = np.clip(np.round(w / np.where(scale == 0, 1.0, scale)), -127, 127).astype(np.int8)
    return Int8Weight(values, scale.astype(np.float32))


def dequantize_int8(q: Int8Weight, dtype: jnp.dtype) -> jax.Array:
    """`[in, out]` weight in `dtype` (the published layout's meaning: values * scale per column)."""
    return (q.values[...].astype(jnp.float32) * q.scale[...]).astype(dtype)


def int8_matmul(x: jax.Array, q: Int8Weight) -> jax.Array:
    """`x @ dequantize_int8(q)` with the scale applied to the output (the CPU reference path)."""
    return (jnp.dot(x, q.values[...].astype(x.dtype)) * q.scale[...].astype(x.dtype)).astype(x.dtype)


QUANTIZATIONS = ("int8",)
