"""Quantized MoE expert stacks: per-expert weights of one stored format, stacked along a leading expert axis.

An expert projection holds `[X, in, out]`; quantized, each expert's `[in, out]` kernel is quantized
by its format alone (int8 scales per expert and output channel, int4 groups per expert, GGUF blocks
as the file holds them) and the format's arrays are stacked: `StackedWeight.stack` is that format's
module with an `[X, ...]` axis in front of every array. `dequantize` maps the format's own
dequantize over the experts (`jax.vmap`), so every format in `model_lib.quantization` stacks
without code of its own, and the grouped matmul multiplies the dequantized stack
(`grouped_matmul`: the reference path; a fused per-group dequantizing kernel is not built).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from model_lib.quantization.base import QuantizedWeight
from pallas_kernels.moe import grouped_matmul


class StackedWeight(QuantizedWeight):
    """X experts' `[in, out]` kernels in one format; `shape` is `(X, in, out)`."""

    def __init__(self, weights: Sequence[QuantizedWeight]):
        if not weights:
            raise ValueError("an expert stack needs at least one expert")
        graphdef, first = nnx.split(weights[0])
        flats = [nnx.to_flat_state(first)]
        for weight in weights[1:]:
            other, state = nnx.split(weight)
            flat = nnx.to_flat_state(state)
            if other != graphdef or [(p, v.get_value().shape) for p, v in flat] != [
                    (p, v.get_value().shape) for p, v in flats[0]]:
                raise ValueError(f"experts stored in different layouts cannot be stacked ({type(weight).__name__})")
            flats.append(flat)
        stacked = [(path, variable.replace(value=jax.numpy.stack([f[i][1].get_value() for f in flats])))
                   for i, (path, variable) in enumerate(flats[0])]
        self.stack = nnx.merge(graphdef, nnx.from_flat_state(stacked))
        self.shape = (len(weights), *weights[0].shape)

    def matmul(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError("an expert stack multiplies through grouped_matmul")

    def dequantize(self, dtype: Any) -> jax.Array:
        """The float `[X, in, out]` stack in `dtype`."""
        graphdef, state = nnx.split(self.stack)
        return jax.vmap(lambda expert: nnx.merge(graphdef, expert).dequantize(dtype))(state)

    def grouped_matmul(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """`x [M, in]` sorted by expert (`group_sizes [X]`) -> `[M, out]` (`pallas_kernels.moe.grouped_matmul`)."""
        return grouped_matmul(x, self.dequantize(x.dtype), group_sizes)
