"""NF4 with double quantization (QLoRA / bitsandbytes).

A weight is flattened and cut into blocks of 64 values; each block stores
4-bit indices into the 16-value NormalFloat code (two per byte) and its absmax.
The absmax constants are quantized again ("double quantization"): their mean is
subtracted and they are stored as int8 in blocks of 256 with one float32 scale
per block (QLoRA uses 8-bit floats here; int8 with a per-block scale keeps the
same 0.127 -> ~0.5 bit/parameter overhead saving and dequantizes with one
multiply). Dequantization is pure jnp and runs inside the jitted step.

Quantization runs on the host a few rows at a time, so a checkpoint tensor can be
quantized as it is read without a float32 copy of the whole kernel; the full-precision
base never reaches the device. A kernel whose rows hold whole blocks (`out % 64 == 0`)
keeps its `[in, out]` axes in NF4 (`packed [in, out / 2]`, `absmax_q [in, out / 64]`),
so the storage carries the kernel's logical axes and shards like it (`fsdp`, `tensor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model_lib.quantization.base import QuantizedWeight, QuantState, on_device

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


# Values quantized at a time on the host: the nearest-code search holds a [values, 16]
# float32 temporary (64 MiB here), never one of a whole kernel (3.7 GB for 4096 x 14336).
CHUNK_VALUES = 1 << 20
# Values dequantized at a time inside the jitted step: a larger kernel is multiplied in
# column chunks, each dequantized, used and dropped (the backward recomputes them).
DEQUANT_CHUNK_VALUES = 1 << 24


@dataclass(frozen=True)
class NF4Host:
    """The NF4 arrays of one weight on the host, before they are placed."""

    packed: np.ndarray  # uint8, two 4-bit codes per byte: [in, out / 2] (rows layout) or [n / 2]
    absmax_q: np.ndarray  # int8, one per 64-value block: [in, out / 64] or [n / 64]
    absmax_scale: np.ndarray  # float32 [ceil(n / 64 / 256)]
    offset: float
    shape: tuple[int, ...]


def rows_layout(shape: Sequence[int]) -> bool:
    """Whether blocks stay inside kernel rows (`out % 64 == 0`): then NF4 keeps the `[in, out]` axes."""
    return len(shape) == 2 and shape[1] % BLOCK == 0


def nf4_storage_axes(
    shape: Sequence[int], axes: Sequence[str | None] | None, head_size: int
) -> dict[str, dict[str, Any]]:
    """Logical-axis metadata of each NF4 array of a kernel with these `axes` (sharding follows the kernel).

    In the rows layout, `packed` and `absmax_q` keep the kernel's two axes (a head axis only where a
    head spans whole blocks); the flat layout and the small double-quantization constants replicate.
    """
    flat = {"logical_axes": (None,), "head_size": 1}
    if axes is None or not rows_layout(shape):
        return {"packed": flat, "absmax_q": flat}
    in_axis, out_axis = axes
    heads = out_axis is not None and out_axis.endswith("heads")
    if heads and head_size % BLOCK:
        out_axis, head_size = None, BLOCK  # a block spans several heads: keep the head axis whole
    head_size = head_size if heads else BLOCK
    return {
        "packed": {"logical_axes": (in_axis, out_axis), "head_size": head_size // 2},
        "absmax_q": {"logical_axes": (in_axis, out_axis), "head_size": head_size // BLOCK},
    }


class NF4Weight(QuantizedWeight):
    """The NF4 form of one `[in, out]` kernel; arrays may be host (copied to the device) or placed."""

    def __init__(
        self,
        packed: Any,
        absmax_q: Any,
        absmax_scale: Any,
        offset: Any,
        shape: tuple[int, ...],
        *,
        axes: Sequence[str | None] | None = None,
        head_size: int = 1,
    ):
        meta = nf4_storage_axes(shape, axes, head_size)
        self.packed = QuantState(on_device(packed), **meta["packed"])
        self.absmax_q = QuantState(on_device(absmax_q), **meta["absmax_q"])
        self.absmax_scale = QuantState(on_device(absmax_scale), logical_axes=(None,))
        self.offset = QuantState(on_device(np.asarray(offset, np.float32)), logical_axes=())
        self.shape = tuple(shape)

    def matmul(self, x: jax.Array) -> jax.Array:
        return nf4_matmul(x, self)

    def dequantize(self, dtype: Any) -> jax.Array:
        return dequantize_nf4(self, dtype)


def quantize_nf4_host(weight: np.ndarray, dtype: Any = None, *, chunk_values: int = CHUNK_VALUES) -> NF4Host:
    """Quantize a float `[in, out]` kernel on the host, a few rows at a time.

    `weight` may be a strided view (a transposed checkpoint tensor) in any float dtype; each
    chunk is rounded to `dtype` (the base weight's dtype, default its own) and then to float32,
    so the result equals quantizing the whole kernel held in `dtype`. Its size must be a
    multiple of 128.
    """
    shape = tuple(weight.shape)
    size = math.prod(shape)
    if size % (2 * BLOCK):
        raise ValueError(f"NF4 needs a multiple of {2 * BLOCK} values, the weight has {size} ({shape})")
    rows = weight.reshape(shape[0], -1) if weight.ndim > 1 else weight.reshape(1, -1)
    width = rows.shape[1]
    align = BLOCK // math.gcd(width, BLOCK)  # rows per chunk must hold whole blocks
    step = max(align, chunk_values // width // align * align)
    dtype = rows.dtype if dtype is None else np.dtype(dtype)
    packed_parts, absmax_parts = [], []
    for start in range(0, rows.shape[0], step):
        blocks = rows[start : start + step].astype(dtype, copy=False).astype(np.float32).reshape(-1, BLOCK)
        absmax = np.abs(blocks).max(axis=1)
        normalised = blocks / np.where(absmax == 0, 1.0, absmax)[:, None]
        codes = np.abs(normalised[..., None] - NF4_CODE).argmin(axis=-1).astype(np.uint8).reshape(-1)
        packed_parts.append((codes[0::2] << 4) | codes[1::2])
        absmax_parts.append(absmax)
    packed, absmax = np.concatenate(packed_parts), np.concatenate(absmax_parts)

    offset = float(absmax.mean())
    centred = absmax - offset
    pad = -len(centred) % ABSMAX_BLOCK
    groups = np.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
    scale = np.abs(groups).max(axis=1) / 127.0
    absmax_q = np.round(groups / np.where(scale == 0, 1.0, scale)[:, None]).astype(np.int8).reshape(-1)[: len(centred)]
    if rows_layout(shape):  # the same bytes, viewed per kernel row
        packed, absmax_q = packed.reshape(shape[0], -1), absmax_q.reshape(shape[0], -1)
    return NF4Host(packed, absmax_q, scale.astype(np.float32), offset, shape)


def quantize_nf4(
    weight: np.ndarray, dtype: Any = None, *, axes: Sequence[str | None] | None = None, head_size: int = 1
) -> NF4Weight:
    """Quantize a float `[in, out]` kernel (host side) into an `NF4Weight` on the default device."""
    host = quantize_nf4_host(weight, dtype)
    return NF4Weight(host.packed, host.absmax_q, host.absmax_scale, host.offset, host.shape, axes=axes, head_size=head_size)


def _dequantize(packed: jax.Array, absmax_q: jax.Array, scales: jax.Array, offset: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`[..., m]` weight values from `packed [..., m / 2]`, `absmax_q [..., m / 64]` and each block's scale.

    Scales come expanded per block (`_block_scales`), so a column slice of a kernel dequantizes alone.
    """
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)
    values = jnp.asarray(NF4_CODE)[codes].reshape(*absmax_q.shape, BLOCK)
    absmax = absmax_q.astype(jnp.float32) * scales + offset
    return (values * absmax[..., None]).reshape(*packed.shape[:-1], -1).astype(dtype)


def _block_scales(q: NF4Weight) -> jax.Array:
    """Each block's double-quantization scale, shaped like `absmax_q`."""
    absmax_q = q.absmax_q[...]
    num_blocks = math.prod(absmax_q.shape)
    return jnp.repeat(q.absmax_scale[...], ABSMAX_BLOCK)[:num_blocks].reshape(absmax_q.shape)


def dequantize_nf4(q: NF4Weight, dtype: jnp.dtype) -> jax.Array:
    """`[in, out]` weight in `dtype`; traceable (runs inside the jitted step)."""
    absmax_q = q.absmax_q[...]
    return _dequantize(q.packed[...], absmax_q, _block_scales(q), q.offset[...], dtype).reshape(q.shape)


def _column_chunks(shape: Sequence[int], budget: int) -> int:
    """How many equal column chunks (whole blocks each) keep a dequantized chunk under `budget` values."""
    rows, blocks = shape[0], shape[1] // BLOCK
    for chunks in range(1, blocks + 1):
        if blocks % chunks == 0 and rows * (shape[1] // chunks) <= budget:
            return chunks
    return blocks


def nf4_matmul(x: jax.Array, q: NF4Weight, *, budget: int = DEQUANT_CHUNK_VALUES) -> jax.Array:
    """`x @ dequantize(q)` without keeping the dequantized kernel.

    Rematerialised: the backward pass dequantizes again instead of saving the weight, so a
    step holds one layer's dequantized kernel at a time, never the full-precision base. A
    kernel above `budget` values (the output head) is multiplied in column chunks.
    """
    dtype = x.dtype
    scales = _block_scales(q)
    chunks = _column_chunks(q.shape, budget) if rows_layout(q.shape) else 1
    if chunks == 1:

        @jax.checkpoint
        def whole(x, packed, absmax_q, scales, offset):
            w = _dequantize(packed, absmax_q, scales, offset, dtype).reshape(q.shape)
            return jnp.dot(x, w)

        return whole(x, q.packed[...], q.absmax_q[...], scales, q.offset[...])

    widths = {"packed": q.packed.shape[1] // chunks, "blocks": q.absmax_q.shape[1] // chunks}

    @jax.checkpoint
    def one_chunk(x, packed, absmax_q, scales, offset, index):
        # Slices of the stored arrays (no transposed copy of the whole kernel), dequantized and used at once.
        packed = jax.lax.dynamic_slice_in_dim(packed, index * widths["packed"], widths["packed"], axis=1)
        absmax_q = jax.lax.dynamic_slice_in_dim(absmax_q, index * widths["blocks"], widths["blocks"], axis=1)
        scales = jax.lax.dynamic_slice_in_dim(scales, index * widths["blocks"], widths["blocks"], axis=1)
        return jnp.dot(x, _dequantize(packed, absmax_q, scales, offset, dtype))

    arrays = (q.packed[...], q.absmax_q[...], scales, q.offset[...])
    out = jax.lax.map(lambda index: one_chunk(x, *arrays, index), jnp.arange(chunks))  # [c, ..., w]
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], q.shape[1])


def nf4_take_rows(q: NF4Weight, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `ids` of a quantized `[num, features]` table (an embedding lookup), dequantizing only those."""
    if not rows_layout(q.shape):
        return jnp.take(dequantize_nf4(q, dtype), ids, axis=0)
    blocks_per_row = q.absmax_q.shape[1]
    block = ids[..., None] * blocks_per_row + jnp.arange(blocks_per_row)  # [..., F / 64] global block index
    scales = q.absmax_scale[...][block // ABSMAX_BLOCK]
    packed, absmax_q = jnp.take(q.packed[...], ids, axis=0), jnp.take(q.absmax_q[...], ids, axis=0)
    return _dequantize(packed, absmax_q, scales, q.offset[...], dtype)
