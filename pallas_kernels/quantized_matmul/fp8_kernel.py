"""W8A8 FP8 matmul for decode-sized calls as a Triton-style Pallas kernel: FP8 in memory, bf16 MMAs.

Same contract as `fp8_reference.py`. The activations are quantized outside the kernel (one cheap
jnp pass over x); program `(i, j)` owns one `[BLOCK_M, BLOCK_N]` output tile and walks K, loading
each `[BLOCK_N, BLOCK_K]` tile of the `[N, K]` FP8 weight once (1 byte a weight: a decode step is
bound by reading the weights) and the matching FP8 activation tile. Both are widened to bfloat16
in registers, which holds every e4m3 value exactly, so the bf16 x bf16 products (exact in the
float32 accumulator) are the FP8 x FP8 products; each K step's partial tile is scaled by its
group's activation scales (rows) and weight scales (columns) as it is added, or once at the end
when there is one group.

Why widen instead of an FP8 MMA: jax's Triton lowering gives `tt.dot` no `maxNumImpreciseAcc`, so
Triton would widen FP8 operands to float16 for an Ampere `mma.sync` anyway (see `fp8_ops`); widened
to bf16, 64-row tiles at least become Hopper wgmma. Tiles are the weight-only kernels' decode tiles
(16-64 rows, `triton_kernel.config`). Prefill-sized calls, bound by arithmetic, go to XLA's FP8
GEMMs instead (`fp8_ops`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import fp8_reference
from pallas_kernels.quantized_matmul.triton_kernel import DECODE_ROWS, config
from pallas_kernels.triton_tiles import BlockConfig

MMA_DTYPE = jnp.bfloat16  # holds every float8_e4m3fn value exactly


def fp8_config(num_rows: int, k: int, n: int, groups: int) -> BlockConfig | None:
    """Tiles for a decode-sized call (None past `DECODE_ROWS` rows, or when no tile fits a K group)."""
    if num_rows > DECODE_ROWS or k % groups:
        return None
    return config(num_rows, k // groups, n)


def _kernel(x_ref, x_scale_ref, values_ref, scales_ref, out_ref, *, tiles: BlockConfig, steps_per_group: int):
    block_m, block_n, block_k = tiles.block_m, tiles.block_n, tiles.block_k
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_n, block_n), block_n)
    groups = scales_ref.shape[0]

    def scaled(part, group):
        return part * x_scale_ref[group, rows][:, None] * scales_ref[group, cols][None, :]

    def body(step, acc):
        ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        x = x_ref[rows, ks].astype(MMA_DTYPE)
        w = values_ref[cols, ks].astype(MMA_DTYPE)  # [BLOCK_N, BLOCK_K]: K contiguous, as stored
        part = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        # lax.div, not `//`: jnp's floor fix-ups lower to i1-typed selects in Triton (see moe).
        return acc + (part if groups == 1 else scaled(part, lax.div(step, jnp.int32(steps_per_group))))

    acc = lax.fori_loop(0, values_ref.shape[1] // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[rows, cols] = (scaled(acc, 0) if groups == 1 else acc).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def fp8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Kernel version of `fp8_reference.fp8_matmul` for up to `DECODE_ROWS` rows: `[M, N]` in x's dtype."""
    (num_rows, depth), (width, groups) = x.shape, (values.shape[0], scales.shape[0])
    tiles = fp8_config(num_rows, depth, width, groups)
    if tiles is None:
        raise ValueError(f"no fp8 tiles fit x {x.shape}, weights {values.shape}, {groups} groups")
    q, x_scale = fp8_reference.quantize_activations(x, groups)
    padded = -num_rows % tiles.block_m
    q = jnp.pad(q, ((0, padded), (0, 0)))
    x_scale = jnp.pad(x_scale, ((0, padded), (0, 0))).T  # [G, M]: a group's row scales contiguous
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_kernel, tiles=tiles, steps_per_group=depth // groups // tiles.block_k)
    out = pl.pallas_call(
        kernel,
        grid=(q.shape[0] // tiles.block_m, width // tiles.block_n),
        in_specs=[whole(q.shape), whole(x_scale.shape), whole(values.shape), whole(scales.shape)],
        out_specs=whole((q.shape[0], width)),
        out_shape=jax.ShapeDtypeStruct((q.shape[0], width), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"fp8_matmul_m{tiles.block_m}_n{tiles.block_n}_k{tiles.block_k}",
    )(q, x_scale, values, scales.astype(jnp.float32))
    return out[:num_rows]
