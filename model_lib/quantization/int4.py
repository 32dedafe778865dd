"""Weight-only int4 with group scales and zero points (`quantization="int4"`; AWQ / GPTQ's scheme).

A `[in, out]` kernel is cut along its input rows into groups of `group_size` (128 by default,
as AWQ and GPTQ use; 64 or 32 where 128 does not divide the input width); each group and output column keeps a float32 scale and an integer zero
point, and each weight a 4-bit value q in [0, 15]: `w = (q - zero) * scale` (asymmetric,
round to nearest: `scale = (max - min) / 15`, `zero = round(-min / scale)`). The values are
packed two per byte in `pallas_kernels.quantized_matmul`'s group-halves layout; the matmul is
that package's `int4_matmul` (a fused dequantize-matmul Pallas kernel on GPU, jnp elsewhere).

Act-order checkpoints (GPTQ `desc_act`) assign rows to groups out of order; such a weight is
stored with its rows sorted by group and `perm` (the original row of each stored row), and the
matmul gathers x's columns by `perm` first: `x @ W == x[..., perm] @ W[perm]`.

Pre-quantized checkpoints (`model_lib.quantization.checkpoints`) convert their layouts into
this one on the host, so AWQ, GPTQ and compressed-tensors weights serve through the same path.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.quantization.base import QuantizedWeight, QuantState, on_device, storage_meta
from pallas_kernels.quantized_matmul import int4_matmul
from pallas_kernels.quantized_matmul.reference import dequantize_int4, pack_int4

GROUP_SIZE = 128
MAX_GROUP_SIZE = 1 << 16  # a bound on checkpoint-given group sizes (per-channel groups are the input width)


class Int4Weight(QuantizedWeight):
    """The int4 form of one `[in, out]` kernel: `packed [in / 2, out]` uint8, `scales` and `zeros` `[in / G, out]`."""

    GROUPED = ("packed", 0, ("scales", "zeros"))

    def __init__(self, packed: Any, scales: Any, zeros: Any, perm: Any = None, *,
                 axes: Sequence[str | None] | None = None, head_size: int = 1):
        self.shape = (2 * packed.shape[0], packed.shape[1])
        group = self.shape[0] // scales.shape[0]
        self.packed = QuantState(on_device(packed), **storage_meta(axes, head_size, ("in", "out"), 2))
        groups = storage_meta(axes, head_size, ("in", "out"), group)
        self.scales = QuantState(on_device(scales), **groups)  # float32
        self.zeros = QuantState(on_device(zeros), **groups)  # uint8
        # [in] int32: a gather of x's columns, replicated
        self.perm = QuantState(on_device(perm), logical_axes=(None,)) if perm is not None else nnx.data(None)

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scales.shape[0]

    def matmul(self, x: jax.Array) -> jax.Array:
        if self.perm is not None:
            x = jnp.take(x, self.perm[...], axis=-1)
        return int4_matmul(x, self.packed[...], self.scales[...], self.zeros[...])

    def dequantize(self, dtype: Any) -> jax.Array:
        w = dequantize_int4(self.packed[...], self.scales[...], self.zeros[...], dtype)
        return w if self.perm is None else w[jnp.argsort(self.perm[...])]


def group_size_for(in_features: int, group_size: int = GROUP_SIZE) -> int:
    """`group_size`, halved down to 32 until it divides the input width (SmolLM2's 576 takes 64); else
    one group per column (the whole input)."""
    while group_size >= 32:
        if in_features % group_size == 0:
            return group_size
        group_size //= 2
    return in_features


def check_group_size(in_features: int, group_size: int) -> None:
    if not 2 <= group_size <= MAX_GROUP_SIZE or group_size % 2 or in_features % group_size:
        raise ValueError(f"int4 group size {group_size} must be even, at most {MAX_GROUP_SIZE}, and divide the "
                         f"input width {in_features}")


def from_values(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, perm: np.ndarray | None = None, *,
                axes: Sequence[str | None] | None = None, head_size: int = 1) -> Int4Weight:
    """An `Int4Weight` from unpacked `q [in, out]` (0..15), `scales`/`zeros [in / G, out]` (host arrays);
    `axes`: the kernel's logical axes."""
    group_size = q.shape[0] // scales.shape[0]
    check_group_size(q.shape[0], group_size)
    if zeros.min() < 0 or zeros.max() > 255:
        raise ValueError(f"int4 zero points must lie in [0, 255], got [{zeros.min()}, {zeros.max()}]")
    return Int4Weight(pack_int4(q, group_size), np.asarray(scales, np.float32), np.asarray(zeros, np.uint8),
                      None if perm is None else np.asarray(perm, np.int32), axes=axes, head_size=head_size)


def quantize_int4(weight: np.ndarray, group_size: int | None = None, *, axes: Sequence[str | None] | None = None,
                  head_size: int = 1) -> Int4Weight:
    """Asymmetric int4 of a float `[in, out]` kernel (host side), groups of `group_size` input rows."""
    w = np.asarray(weight, np.float32)
    group_size = group_size_for(w.shape[0]) if group_size is None else group_size
    check_group_size(w.shape[0], group_size)
    groups = w.reshape(w.shape[0] // group_size, group_size, w.shape[1])
    low, high = groups.min(axis=1), groups.max(axis=1)
    scales = (high - low) / 15.0
    scales = np.where(scales == 0, 1.0, scales)
    zeros = np.clip(np.round(-low / scales), 0, 15)
    q = np.clip(np.round(groups / scales[:, None]) + zeros[:, None], 0, 15).reshape(w.shape)
    return from_values(q.astype(np.uint8), scales, zeros, axes=axes, head_size=head_size)
