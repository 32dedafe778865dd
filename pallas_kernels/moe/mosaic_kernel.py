"""Grouped matmul forward as a Mosaic GPU (Pallas `mosaic_gpu`) kernel for Hopper.

Same contract as `triton_kernel.gmm` without `transpose_rhs` (`lhs [M, K]` rows sorted by
group, `rhs [G, K, N]`, `group_sizes [G]` -> `[M, N]`, rows past the groups zero), on
Hopper's own paths: TMA copies into swizzled shared memory, `wgmma` with a float32
accumulator in registers, and a K pipeline `max_concurrent_steps` deep.

Design (that of jax's bundled `ragged_dot_mgpu.py`, with the row-tile schedule of
`triton_kernel.schedule`, which also covers rows past the groups): a persistent grid of
one program per SM walks the (visit, N tile) pairs, where a visit is one row tile of
`block_m` rows seen by one group (a tile shared by two groups is visited twice). Each
pair runs the K pipeline for its group's weights, converts the accumulator to the output
dtype in shared memory, and stores only its group's rows: TMA stores have static shapes,
so the rows go out as a ladder of power-of-two row slices (at most log2(block_m) + 1
stores). The tail pseudo-group stores zeros without a matmul; unused visits do nothing.

Limits (`unsupported_reason`): bfloat16 or float16 (wgmma has no float32 input here),
K a multiple of 64 (one 128-byte swizzled K step) and N a multiple of 64. M is padded to
a whole number of row tiles. The weight gradients stay with the Triton kernels
(`grouped_matmul` wraps this forward in the Triton custom VJP).

Checked here by lowering for an H100 (`tests/pallas_kernels/test_gpu_lowering.py`) and on
Mosaic GPU's interpreter (`tests/pallas_kernels/test_moe_mosaic.py`); a GPU checks its compiled
numbers (`tests/pallas_kernels/test_moe.py`, `gpu`-marked) and its speed (`benchmarks/moe.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.moe import triton_kernel

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_K = 64  # 64 x 2 bytes: one 128-byte swizzled row per K step
MIN_BLOCK_N = 64
H100_SMS = 132
MAX_CONCURRENT_STEPS = 8  # K steps in flight; each holds a [block_m + block_n, 64] pair in shared memory


def unsupported_reason(lhs_shape, rhs_shape, lhs_dtype, rhs_dtype) -> str | None:
    """Why the Mosaic kernel cannot run these shapes and dtypes (None: it can)."""
    (_, depth), (_, depth_rhs, width) = lhs_shape, rhs_shape
    if depth != depth_rhs:
        return f"lhs K={depth} != rhs K={depth_rhs}"
    if jnp.dtype(lhs_dtype) != jnp.dtype(rhs_dtype) or jnp.dtype(lhs_dtype) not in DTYPES:
        return f"dtypes {lhs_dtype}/{rhs_dtype} (both bfloat16 or both float16 needed)"
    if depth % BLOCK_K or width % MIN_BLOCK_N:
        return f"K={depth}, N={width} (multiples of {BLOCK_K} and {MIN_BLOCK_N} needed)"
    return None


def config(num_rows: int, width: int, num_groups: int) -> tuple[int, int]:
    """(block_m, block_n): 128-row tiles when groups average 128+ rows, else 64 (wgmma's smallest M);
    the widest N tile of 256, 128 or 64 that divides N (fewer programs re-reading each lhs tile)."""
    block_m = 128 if num_rows // max(1, num_groups) >= 128 else 64
    block_n = next(b for b in (256, 128, 64) if width % b == 0)
    if block_m == 128 and block_n == 256:
        block_n = 128 if width % 128 == 0 else block_n  # a 128 x 256 float32 accumulator is 256 registers/thread
    return block_m, block_n


def _store_rows(o_smem, o_gmem, first: jax.Array, count: jax.Array, row0: jax.Array, col0: jax.Array,
                block_m: int, block_n: int) -> None:
    """Store rows `[first, first + count)` of the tile in `o_smem` to `o_gmem` rows `row0 + first ...`,
    as power-of-two slices from the largest down (TMA shapes are static, `count` is not)."""
    offset = first
    for bit in reversed(range(int(math.log2(block_m)) + 1)):
        rows = 1 << bit

        @pl.when(count & rows != 0)
        def _():
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, rows)],
                                    o_gmem.at[pl.ds(row0 + offset, rows), pl.ds(col0, block_n)])

        offset = offset + (count & rows)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _body(visit_group, visit_tile, visit_start, visit_end, lhs_gmem, rhs_gmem, o_gmem, *, num_groups: int,
          num_visits: int, block_m: int, block_n: int, max_concurrent_steps: int):
    depth, width = rhs_gmem.shape[1:]
    n_tiles = width // block_n

    @plgpu.nd_loop((num_visits * n_tiles,), collective_axes="sm")
    def _(loop: plgpu.NDLoopInfo):
        visit, ni = loop.index[0] // n_tiles, loop.index[0] % n_tiles
        group, tile = visit_group[visit], visit_tile[visit]
        row0 = tile * block_m
        first = jnp.maximum(visit_start[visit], row0) - row0
        count = jnp.minimum(visit_end[visit], row0 + block_m) - row0 - first

        def store(values: jax.Array) -> None:
            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), o_gmem.dtype))
            def _(o_smem):
                o_smem[...] = values.astype(o_smem.dtype)
                plgpu.commit_smem()
                _store_rows(o_smem, o_gmem, first, count, row0, ni * block_n, block_m, block_n)

        @pl.when((group >= 0) & (group < num_groups))
        def _():
            def accumulate(acc_ref):
                plgpu.emit_pipeline(
                    lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
                    grid=(depth // BLOCK_K,),
                    in_specs=[
                        plgpu.BlockSpec((block_m, BLOCK_K), lambda k: (tile, k), delay_release=1),
                        plgpu.BlockSpec((BLOCK_K, block_n), lambda k: (k, ni), delay_release=1),
                    ],
                    max_concurrent_steps=max_concurrent_steps,
                )(lhs_gmem, rhs_gmem.at[group])
                return acc_ref[...]

            store(pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n))))

        @pl.when(group == num_groups)  # the rows past the groups
        def _():
            store(jnp.zeros((block_m, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "max_concurrent_steps", "num_sms", "interpret"))
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    max_concurrent_steps: int = 4,
    num_sms: int = H100_SMS,
    interpret: bool = False,
) -> jax.Array:
    """Mosaic GPU version of `triton_kernel.gmm` (forward, rhs not transposed); `[M, N]` in lhs's dtype.
    `block_m` is 64 or 128, `block_n` a multiple of 64 up to 256 dividing N (None: `config`)."""
    reason = unsupported_reason(lhs.shape, rhs.shape, lhs.dtype, rhs.dtype)
    if reason:
        raise ValueError(f"the Mosaic grouped matmul does not cover {reason}")
    num_rows = lhs.shape[0]
    num_groups, _, width = rhs.shape
    default_m, default_n = config(num_rows, width, num_groups)
    block_m, block_n = block_m or default_m, block_n or default_n
    if block_m not in (64, 128) or block_n % MIN_BLOCK_N or block_n > 256 or width % block_n:
        raise ValueError(f"block_m={block_m} must be 64 or 128, block_n={block_n} a multiple of {MIN_BLOCK_N} "
                         f"up to 256 dividing N={width}")
    if not 1 <= max_concurrent_steps <= MAX_CONCURRENT_STEPS or not 1 <= num_sms <= 1024:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be in [1, {MAX_CONCURRENT_STEPS}], "
                         f"num_sms={num_sms} in [1, 1024]")
    lhs_padded = triton_kernel.pad_rows(lhs, block_m)
    padded_rows = lhs_padded.shape[0]
    visits = triton_kernel.schedule(group_sizes.astype(jnp.int32), padded_rows, block_m)
    body = functools.partial(_body, num_groups=num_groups, num_visits=visits[0].shape[0], block_m=block_m,
                             block_n=block_n, max_concurrent_steps=max_concurrent_steps)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((padded_rows, width), lhs.dtype),
        grid=(num_sms,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name=f"gmm_mosaic_m{block_m}_n{block_n}",
    )
    return kernel(*visits, lhs_padded, rhs)[:num_rows]


@jax.custom_vjp
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Differentiable `gmm`: this forward, the Triton kernels' backward (input and weight gradients)."""
    return gmm(lhs, rhs, group_sizes.astype(jnp.int32))


def _grouped_matmul_fwd(lhs, rhs, group_sizes):
    return grouped_matmul(lhs, rhs, group_sizes), (lhs, rhs, group_sizes.astype(jnp.int32))


grouped_matmul.defvjp(_grouped_matmul_fwd, functools.partial(triton_kernel.grouped_matmul_bwd, ()))
