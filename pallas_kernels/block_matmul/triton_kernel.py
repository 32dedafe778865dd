"""Fused dequantize-matmul over affine blocks (`reference.py`'s contract) as a Triton-style Pallas kernel.

Program `(i, j)` of a 2-D grid owns one `[BLOCK_M, BLOCK_N]` output tile and walks K block by
block, loading the stored values in their width (4 or 8 bits), so the weights cross memory
compressed; unpacking, scaling and offsetting happen in registers, and the products accumulate
in float32. One K step covers `BLOCK_K` rows of one block's first half and the `BLOCK_K` rows
`G / 2` further: for 4 bits these are the low and high nibbles of one packed tile (the layout
keeps them apart), for 8 bits two tiles of the values; both are dequantized with the block's
scale row (and offset row) and multiplied by the matching two column slices of x.

Tiles and the launch are `quantized_matmul`'s (`config`, `launch`): GGUF's 32-row blocks give
16-deep K steps, decode calls 16-row tiles and prefill calls 128 x 128 tiles on 8 warps (wgmma
on Hopper).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul.triton_kernel import launch
from pallas_kernels.quantized_matmul.triton_kernel import config, supported
from pallas_kernels.triton_tiles import BlockConfig


def block_config(num_rows: int, k: int, n: int, block_size: int):
    """Tiles for `[M, K] x [K, N]` in blocks of `block_size` rows; None if none fit."""
    return config(num_rows, block_size // 2, n) if block_size % 2 == 0 and k % block_size == 0 else None


def _kernel(x_ref, qs_ref, scales_ref, *rest, tiles: BlockConfig, block_size: int, bits: int, zero: int,
            has_offsets: bool, precision):
    offsets_ref, out_ref = rest if has_offsets else (None, *rest)
    block_m, block_n, block_k = tiles.block_m, tiles.block_n, tiles.block_k
    half = block_size // 2
    steps_per_block = half // block_k
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_n, block_n), block_n)

    def dequantize(q, scale, offset):
        w = (q.astype(jnp.float32) - zero) * scale if zero else q.astype(jnp.float32) * scale
        return (w if offset is None else w + offset).astype(x_ref.dtype)

    def body(step, acc):
        # lax.div, not `//` or `%`: jnp's floor fix-ups lower to i1-typed selects in Triton (see moe).
        block = lax.div(step, jnp.int32(steps_per_block))
        sub = step - block * steps_per_block
        first = pl.multiple_of(block * block_size + sub * block_k, block_k)
        if bits == 4:
            packed = qs_ref[pl.ds(pl.multiple_of(block * half + sub * block_k, block_k), block_k), cols]
            low, high = packed & 0xF, lax.shift_right_logical(packed, jnp.uint8(4))
        else:
            low = qs_ref[pl.ds(first, block_k), cols]
            high = qs_ref[pl.ds(first + half, block_k), cols]
        scale = scales_ref[block, cols].astype(jnp.float32)[None, :]
        offset = offsets_ref[block, cols].astype(jnp.float32)[None, :] if has_offsets else None
        x_low = x_ref[rows, pl.ds(first, block_k)]
        x_high = x_ref[rows, pl.ds(first + half, block_k)]
        acc += pltriton.dot(x_low, dequantize(low, scale, offset), precision=precision).astype(jnp.float32)
        return acc + pltriton.dot(x_high, dequantize(high, scale, offset), precision=precision).astype(jnp.float32)

    steps = scales_ref.shape[0] * steps_per_block
    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[rows, cols] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "zero", "precision", "interpret"))
def block_matmul(x: jax.Array, qs: jax.Array, scales: jax.Array, offsets: jax.Array | None, *, bits: int, zero: int,
                 precision=None, interpret: bool = False) -> jax.Array:
    """Kernel version of `reference.block_matmul`: `[M, N]` in x's dtype."""
    k, n = x.shape[1], qs.shape[1]
    block_size = k // scales.shape[0]
    tiles = block_config(x.shape[0], k, n, block_size)
    if not supported(x.dtype, tiles):
        raise ValueError(f"no block tiles fit x {x.shape} {x.dtype}, N={n}, blocks of {block_size}")
    kernel = functools.partial(_kernel, tiles=tiles, block_size=block_size, bits=bits, zero=zero,
                               has_offsets=offsets is not None, precision=precision)
    weights = (qs, scales) if offsets is None else (qs, scales, offsets)
    return launch(kernel, f"block{bits}_matmul", tiles, x, weights, n, interpret)
