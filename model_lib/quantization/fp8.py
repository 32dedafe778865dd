"""FP8 weights kept in float8_e4m3fn with their scales; W8A8 compute (`quantization="fp8"`).

A `[in, out]` kernel is stored as `values [out, Kp]` float8_e4m3fn (the HF `[out, in]` layout,
1 byte a weight; Kp: the input width rounded up to whole K groups, the padding zero) and
`scales [G, out]` float32, one per output channel and group of `Kp / G` input columns:
- per tensor (llm-compressor `strategy: tensor`): G = 1, every column the same scale;
- per output channel (`strategy: channel`, and `quantize_fp8` of a float checkpoint, as vLLM's
  dynamic FP8 does): G = 1;
- per group (`strategy: group`): `weight_scale [out, G]`;
- 128 x 128 blocks (`quant_method: fp8` with `weight_block_size`, DeepSeek-V3's
  `weight_scale_inv [ceil(out / 128), ceil(in / 128)]`): G = ceil(in / 128), each block's scale
  repeated over its 128 output columns (`scales[g, n] = weight_scale_inv[n // 128, g]`).
The matmul quantizes activations per token and K group and multiplies FP8 x FP8 with float32
accumulation (`pallas_kernels.quantized_matmul.fp8_matmul`: FP8 GEMMs by XLA on GPU, the jnp
reference elsewhere). Checkpoints read on the host become `HostFp8` (see `from_checkpoint`).

Storage carries logical axes (`values` the kernel's two swapped, `scales` its groups' and columns')
and shards with the kernel (`model_lib.quantization.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from model_lib.quantization.base import QuantizedWeight, QuantState, on_device, storage_meta
from pallas_kernels.quantized_matmul import fp8_matmul
from pallas_kernels.quantized_matmul.fp8_reference import FP8_MAX, dequantize_fp8

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


class Fp8Error(ValueError):
    """FP8 weight tensors whose scales do not fit the weight."""


class Fp8Weight(QuantizedWeight):
    """The FP8 form of one `[in, out]` kernel: `values [out, Kp]` float8_e4m3fn, `scales [G, out]` float32."""

    GROUPED = ("values", 1, ("scales",))

    def __init__(self, values: Any, scales: Any, in_features: int, *, axes: Sequence[str | None] | None = None,
                 head_size: int = 1):
        self.shape = (int(in_features), int(values.shape[0]))
        group = values.shape[1] // scales.shape[0]
        self.values = QuantState(on_device(values), **storage_meta(axes, head_size, ("out", "in")))
        # one group (per tensor / channel): no input axis to follow
        scale_dims = ("in" if scales.shape[0] > 1 else None, "out")
        self.scales = QuantState(on_device(scales), **storage_meta(axes, head_size, scale_dims, group))

    def matmul(self, x: jax.Array) -> jax.Array:
        return fp8_matmul(x, self.values[...], self.scales[...])

    def dequantize(self, dtype: Any) -> jax.Array:
        w = dequantize_fp8(self.values[...], self.scales[...], jnp.float32)[:, : self.shape[0]]
        return w.T.astype(dtype)


@dataclass
class HostFp8:
    """An FP8 weight on the host in `Fp8Weight`'s layout, before it is placed."""

    values: np.ndarray  # [out, Kp] float8_e4m3fn
    scales: np.ndarray  # [G, out] float32
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        """The float kernel's `[in, out]` shape."""
        return self.in_features, self.values.shape[0]

    def dequantized(self) -> np.ndarray:
        """The float32 HF weight `[out, in]`."""
        out, padded = self.values.shape
        groups = self.scales.shape[0]
        w = self.values.astype(np.float32).reshape(out, groups, padded // groups) * self.scales.T[..., None]
        return np.ascontiguousarray(w.reshape(out, padded)[:, : self.in_features])

    def to_weight(self, axes: Sequence[str | None] | None = None, head_size: int = 1) -> Fp8Weight:
        return Fp8Weight(self.values, self.scales, self.in_features, axes=axes, head_size=head_size)


def _padded(values: np.ndarray, groups: int, width: int) -> np.ndarray:
    """`values [out, in]` zero-padded to `groups * width` columns."""
    if values.shape[1] == groups * width:
        return values
    padded = np.zeros((values.shape[0], groups * width), values.dtype)
    padded[:, : values.shape[1]] = values
    return padded


def from_checkpoint(module: str, weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None) -> HostFp8:
    """`weight [out, in]` float8_e4m3fn and its checkpoint scale -> `HostFp8`.

    `block` given: `scale` is `weight_scale_inv`, one per `block` tile (a partial last tile keeps
    tile `row // block`'s scale, as DeepSeek-V3 does). Otherwise `scale` is `weight_scale`: one
    value (per tensor), `[out]` / `[out, 1]` (per channel) or `[out, G]` (per group of input columns).
    """
    out, width = weight.shape
    scale = np.asarray(scale).astype(np.float32)
    if block is not None:
        rows, cols = block
        tiles = (math.ceil(out / rows), math.ceil(width / cols))
        if scale.shape != tiles:
            raise Fp8Error(f"{module}.weight_scale_inv {scale.shape} does not tile {weight.shape} in blocks of {block}")
        scales = np.repeat(scale, rows, 0)[:out].T  # [G, out]
        return HostFp8(_padded(weight, tiles[1], cols), np.ascontiguousarray(scales), width)
    if scale.size == 1:
        return HostFp8(weight, np.full((1, out), scale.reshape(()), np.float32), width)
    if scale.ndim in (1, 2) and scale.shape[0] == out and width % (scale.size // out) == 0:
        return HostFp8(weight, np.ascontiguousarray(scale.reshape(out, -1).T), width)
    raise Fp8Error(f"{module}.weight_scale {scale.shape} fits neither one scale, one per output channel {out}, nor "
                   f"groups dividing the input width {width}")


def quantize_fp8(weight: np.ndarray, *, axes: Sequence[str | None] | None = None, head_size: int = 1) -> Fp8Weight:
    """Dynamic per-output-channel FP8 of a float `[in, out]` kernel (host side): scale = absmax / 448."""
    w = np.asarray(weight, np.float32).T  # [out, in]
    scale = np.abs(w).max(axis=1) / FP8_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    values = np.clip(w / scale[:, None], -FP8_MAX, FP8_MAX).astype(E4M3)
    return Fp8Weight(values, scale[None, :], w.shape[1], axes=axes, head_size=head_size)
