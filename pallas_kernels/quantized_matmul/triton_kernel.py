"""Fused dequantize-matmul for weight-only int4 and int8, as Triton-style Pallas kernels.

Same contracts as `reference.py`. Program `(i, j)` of a 2-D grid owns one `[BLOCK_M, BLOCK_N]`
output tile and walks K, loading each weight tile once in its stored width (4 or 8 bits), so
the weights cross memory compressed; unpacking and scaling happen in registers, and the
products accumulate in float32.

int4: one K step covers `BLOCK_K` packed rows of one group, i.e. `BLOCK_K` weight rows from the
group's first half (low nibbles) and the `BLOCK_K` rows `G / 2` further (high nibbles); both
tiles are dequantized with the group's scale and zero row and multiplied by the matching two
column slices of x (two dots of depth BLOCK_K). int8: one K step is one `[BLOCK_K, BLOCK_N]`
tile converted to x's dtype; the per-column scale multiplies the accumulator once at the end.

Tiles come from the shape (`config`): decode-sized calls (M <= 64) take 16-row tiles and narrow
column tiles (bound by reading the weights: many programs, deep pipelining); prefill-sized ones
take 128 x 128 tiles on 8 warps, which Triton turns into Hopper wgmma. M is padded to whole row
tiles. Triton tiles need power-of-two sides of at least 16 (`supported`: K and N fit, and for
int4 half a group holds a whole number of 16-row steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.triton_tiles import DTYPES, MIN_BLOCK, BlockConfig, fit_block

DECODE_ROWS = 64  # up to this many rows a call is bound by reading the weights


def config(num_rows: int, depth: int, width: int) -> BlockConfig | None:
    """Tiles for `[M, depth] x [depth, width]` (depth: the K extent one step walks within); None if none fit."""
    if num_rows <= DECODE_ROWS:
        block_m = min(DECODE_ROWS, max(MIN_BLOCK, pl.next_power_of_2(num_rows)))
        tiles = BlockConfig(block_m, fit_block(width, 64) or 0, fit_block(depth, 128) or 0, 4, 4)
    else:
        tiles = BlockConfig(128, fit_block(width, 128) or 0, fit_block(depth, 64) or 0, 8, 3)
    return tiles if tiles.block_n and tiles.block_k else None


def int4_config(num_rows: int, k: int, n: int, group_size: int) -> BlockConfig | None:
    return config(num_rows, group_size // 2, n) if group_size % 2 == 0 and k % group_size == 0 else None


def int8_config(num_rows: int, k: int, n: int) -> BlockConfig | None:
    return config(num_rows, k, n)


def supported(x_dtype, tiles: BlockConfig | None) -> bool:
    return tiles is not None and jnp.dtype(x_dtype) in DTYPES


def _int4_kernel(x_ref, packed_ref, scales_ref, zeros_ref, out_ref, *, tiles: BlockConfig, group_size: int, precision):
    block_m, block_n, block_k = tiles.block_m, tiles.block_n, tiles.block_k
    half = group_size // 2
    steps_per_group = half // block_k
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_n, block_n), block_n)

    def body(step, acc):
        # lax.div, not `//` or `%`: jnp's floor fix-ups lower to i1-typed selects in Triton (see moe).
        group = lax.div(step, jnp.int32(steps_per_group))
        sub = step - group * steps_per_group
        packed = packed_ref[pl.ds(pl.multiple_of(group * half + sub * block_k, block_k), block_k), cols]
        scale = scales_ref[group, cols].astype(jnp.float32)[None, :]
        zero = zeros_ref[group, cols].astype(jnp.float32)[None, :]
        low = ((packed & 0xF).astype(jnp.float32) - zero) * scale
        high = (lax.shift_right_logical(packed, jnp.uint8(4)).astype(jnp.float32) - zero) * scale
        first = pl.multiple_of(group * group_size + sub * block_k, block_k)
        x_low = x_ref[rows, pl.ds(first, block_k)]
        x_high = x_ref[rows, pl.ds(first + half, block_k)]
        acc += pltriton.dot(x_low, low.astype(x_ref.dtype), precision=precision).astype(jnp.float32)
        return acc + pltriton.dot(x_high, high.astype(x_ref.dtype), precision=precision).astype(jnp.float32)

    steps = scales_ref.shape[0] * steps_per_group
    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[rows, cols] = acc.astype(out_ref.dtype)


def _int8_kernel(x_ref, values_ref, scale_ref, out_ref, *, tiles: BlockConfig, precision):
    block_m, block_n, block_k = tiles.block_m, tiles.block_n, tiles.block_k
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_n, block_n), block_n)

    def body(step, acc):
        ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        w = values_ref[ks, cols].astype(x_ref.dtype)
        return acc + pltriton.dot(x_ref[rows, ks], w, precision=precision).astype(jnp.float32)

    acc = lax.fori_loop(0, values_ref.shape[0] // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[rows, cols] = (acc * scale_ref[cols].astype(jnp.float32)[None, :]).astype(out_ref.dtype)


def launch(kernel, name: str, tiles: BlockConfig, x: jax.Array, weights: tuple[jax.Array, ...], width: int,
          interpret: bool) -> jax.Array:
    """Pad x to whole row tiles, launch the `(M tiles, N tiles)` grid over whole-array refs, unpad."""
    num_rows = x.shape[0]
    padded = jnp.pad(x, ((0, -num_rows % tiles.block_m), (0, 0)))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(padded.shape[0] // tiles.block_m, width // tiles.block_n),
        in_specs=[whole(padded.shape), *(whole(w.shape) for w in weights)],
        out_specs=whole((padded.shape[0], width)),
        out_shape=jax.ShapeDtypeStruct((padded.shape[0], width), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"{name}_m{tiles.block_m}_n{tiles.block_n}_k{tiles.block_k}",
    )(padded, *weights)
    return out[:num_rows]


@functools.partial(jax.jit, static_argnames=("precision", "interpret"))
def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *, precision=None,
                interpret: bool = False) -> jax.Array:
    """Kernel version of `reference.int4_matmul`: `[M, N]` in x's dtype."""
    group_size = 2 * packed.shape[0] // scales.shape[0]
    tiles = int4_config(x.shape[0], x.shape[1], packed.shape[1], group_size)
    if not supported(x.dtype, tiles):
        raise ValueError(f"no int4 tiles fit x {x.shape} {x.dtype}, N={packed.shape[1]}, group {group_size}")
    kernel = functools.partial(_int4_kernel, tiles=tiles, group_size=group_size, precision=precision)
    return launch(kernel, "int4_matmul", tiles, x, (packed, scales, zeros), packed.shape[1], interpret)


@functools.partial(jax.jit, static_argnames=("precision", "interpret"))
def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, *, precision=None,
                interpret: bool = False) -> jax.Array:
    """Kernel version of `reference.int8_matmul`: `[M, N]` in x's dtype."""
    tiles = int8_config(x.shape[0], *values.shape)
    if not supported(x.dtype, tiles):
        raise ValueError(f"no int8 tiles fit x {x.shape} {x.dtype}, weights {values.shape}")
    kernel = functools.partial(_int8_kernel, tiles=tiles, precision=precision)
    return launch(kernel, "int8_matmul", tiles, x, (values, scale), values.shape[1], interpret)
