"""Grouped (ragged) matmul as Triton-style Pallas kernels for NVIDIA GPUs.

Same contract as `reference.grouped_matmul` (see `ops.py`), plus the two kernels
of its backward pass, tied together by a `jax.custom_vjp` in `grouped_matmul`.

gmm (`lhs [M, K] x rhs [G, K, N] -> [M, N]`, also the input gradient with
`transpose_rhs`, where rhs is read as `[G, N, K]` without a transposed copy):
the rows are cut into row tiles of `BLOCK_M` rows of one group each; a group's
tiles start at its first row, so a tile never straddles two groups. Rows past
`sum(group_sizes)` form one more pseudo-group whose tiles store zeros. The
tile -> (group, first row, group end) schedule is computed on device from
group_sizes with a static length `cdiv(M, BLOCK_M) + G`, a bound on the real
tile count (`schedule`); programs past the real count return at once. Each
program computes one `[BLOCK_M, BLOCK_N]` output tile with a K loop, float32
accumulation, and a masked store of its group's rows. A tile that would read
past row M is shifted back to end at row M (the store mask still picks its own
rows), so every load is in bounds and unmasked. The 1-D grid walks
(row tile, N tile) in supergroups of `GROUP_M` row tiles (the Triton matmul
swizzle), so neighbouring programs share lhs row tiles and rhs column tiles in L2.

tgmm (`lhs [M, K], rhs [M, N] -> [G, K, N]`, `out[g] = lhs_g^T @ rhs_g`, the
weight gradient): program `(k, n, g)` owns one `[BLOCK_K, BLOCK_N]` tile of
`out[g]` and loops over the group's rows `BLOCK_M` at a time, zeroing rows
outside the group in both operands (rows past the groups may hold anything).
A group without rows stores zeros.

Every output element is written by exactly one program. Triton needs
power-of-two tile sides of at least 16: K and N must be multiples of 16
(`supported`; ops.py falls back to `jax.lax.ragged_dot` otherwise). M is padded
to one row tile when smaller than `BLOCK_M`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.moe.reference import group_bounds

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_BLOCK = 16  # the smallest side of a Triton dot tile


def fit_block(dim: int, preferred: int) -> int | None:
    """Largest power of two <= `preferred` (and >= 16) dividing `dim`; None if there is none."""
    block = pl.next_power_of_2(max(preferred, MIN_BLOCK))
    if block > preferred:
        block //= 2
    while block >= MIN_BLOCK:
        if dim % block == 0:
            return block
        block //= 2
    return None


def supported(lhs_shape, rhs_shape, lhs_dtype, rhs_dtype) -> bool:
    """Whether the kernels (forward and both gradients) have tiles for these shapes and dtypes."""
    (_, k), (_, k_rhs, n) = lhs_shape, rhs_shape
    return (
        k == k_rhs
        and jnp.dtype(lhs_dtype) == jnp.dtype(rhs_dtype)
        and jnp.dtype(lhs_dtype) in DTYPES
        and fit_block(k, MIN_BLOCK) is not None
        and fit_block(n, MIN_BLOCK) is not None
    )


def default_block_m(num_rows: int, num_groups: int) -> int:
    """Row tile for the average group size (small groups waste less of a small tile), 16..128."""
    return min(128, max(MIN_BLOCK, pl.next_power_of_2(max(1, num_rows // num_groups))))


def schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row tiles that never straddle two groups: per tile its group (G for the zero tail past the
    groups, -1 for an unused tile), its first row and its group's end row.

    Static length `cdiv(M, BLOCK_M) + G`: G groups and the tail split M rows into G + 1 pieces,
    and `sum(cdiv(size, BLOCK_M)) < M / BLOCK_M + G + 1` over G + 1 pieces.
    """
    num_groups = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    piece_start = jnp.concatenate([starts, ends[-1:]])  # [G + 1]: the groups, then the tail
    piece_end = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    tiles = (piece_end - piece_start + block_m - 1) // block_m
    cu_tiles = jnp.cumsum(tiles).astype(jnp.int32)
    tile = jnp.arange(pl.cdiv(num_rows, block_m) + num_groups, dtype=jnp.int32)
    piece = jnp.minimum(jnp.searchsorted(cu_tiles, tile, side="right"), num_groups).astype(jnp.int32)
    first = piece_start[piece] + (tile - (cu_tiles[piece] - tiles[piece])) * block_m
    return jnp.where(tile < cu_tiles[-1], piece, -1), first, piece_end[piece]


def _gmm_kernel(
    tile_group_ref,  # [T] group of each row tile; G: zero tail; -1: unused
    tile_start_ref,  # [T] first row of each tile
    tile_end_ref,  # [T] end row of the tile's group
    lhs_ref,  # [M, K]
    rhs_ref,  # [G, K, N], or [G, N, K] with transpose_rhs
    out_ref,  # [M, N]
    *,
    num_tiles: int,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int,
    transpose_rhs: bool,
    precision,
):
    num_rows, depth = lhs_ref.shape
    num_groups = rhs_ref.shape[0]
    num_n = out_ref.shape[1] // block_n
    # Swizzle: GROUP_M row tiles x all N tiles, row tile fastest.
    pid = pl.program_id(0)
    width = group_m * num_n
    first_tile = (pid // width) * group_m
    height = jnp.minimum(num_tiles - first_tile, group_m)
    tile = first_tile + (pid % width) % height
    n = (pid % width) // height
    group = tile_group_ref[tile]

    @pl.when(group >= 0)
    def _():
        start = tile_start_ref[tile]
        end = jnp.minimum(start + block_m, tile_end_ref[tile])
        window = jnp.minimum(start, num_rows - block_m)  # stays inside [0, M)
        rows = window + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        mine = (rows >= start) & (rows < end)
        expert = jnp.minimum(group, num_groups - 1)
        cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

        def body(step, acc):
            ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
            a = lhs_ref[pl.ds(window, block_m), ks]
            if transpose_rhs:
                b = rhs_ref[expert, cols, ks]  # [BLOCK_N, BLOCK_K]
                return acc + pltriton.dot(a, b, trans_b=True, precision=precision).astype(jnp.float32)
            b = rhs_ref[expert, ks, cols]  # [BLOCK_K, BLOCK_N]
            return acc + pltriton.dot(a, b, precision=precision).astype(jnp.float32)

        steps = jnp.where(group < num_groups, depth // block_k, 0)  # the tail stores zeros
        acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
        pltriton.store(out_ref.at[pl.ds(window, block_m), cols], acc.astype(out_ref.dtype), mask=mine[:, None])


def _tgmm_kernel(
    group_start_ref,  # [G]
    group_end_ref,  # [G]
    lhs_ref,  # [M, K]
    rhs_ref,  # [M, N]
    out_ref,  # [G, K, N]
    *,
    block_m: int,
    block_k: int,
    block_n: int,
    precision,
):
    k, n, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_rows = lhs_ref.shape[0]
    start, end = group_start_ref[g], group_end_ref[g]
    ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    ns = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    def body(step, acc):
        first = start + step * block_m
        window = jnp.minimum(first, num_rows - block_m)
        rows = window + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        mine = ((rows >= first) & (rows < end))[:, None]
        a = lhs_ref[pl.ds(window, block_m), ks]
        b = rhs_ref[pl.ds(window, block_m), ns]
        a = jnp.where(mine, a, jnp.zeros_like(a))
        b = jnp.where(mine, b, jnp.zeros_like(b))
        return acc + pltriton.dot(a, b, trans_a=True, precision=precision).astype(jnp.float32)

    steps = pl.cdiv(end - start, block_m)
    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[g, ks, ns] = acc.astype(out_ref.dtype)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _warps(block_a: int, block_b: int) -> int:
    return 8 if block_a * block_b >= 128 * 128 else 4


@functools.partial(
    jax.jit,
    static_argnames=("transpose_rhs", "block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages",
                     "precision", "interpret"),
)
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int | None = None,
    group_m: int = 8,
    num_warps: int | None = None,
    num_stages: int = 3,
    precision=None,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.grouped_matmul`; `[M, N]` in lhs's dtype.

    With `transpose_rhs`, rhs is `[G, N, K]` and group g multiplies by `rhs[g].T`. Block sizes
    are upper bounds: each is cut to the largest power of two that divides its dimension.
    """
    num_rows, depth = lhs.shape
    num_groups = rhs.shape[0]
    width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    assert (rhs.shape[2] if transpose_rhs else rhs.shape[1]) == depth, (lhs.shape, rhs.shape, transpose_rhs)
    block_m = block_m or default_block_m(num_rows, num_groups)
    block_k = fit_block(depth, block_k or (64 if lhs.dtype.itemsize <= 2 else 32))
    block_n = fit_block(width, block_n)
    if block_k is None or block_n is None:
        raise ValueError(f"no tile fits K={depth}, N={width}: both must be multiples of {MIN_BLOCK}")
    num_warps = num_warps or _warps(block_m, block_n)

    lhs_padded = _pad_rows(lhs, block_m)
    padded_rows = lhs_padded.shape[0]
    tile_group, tile_start, tile_end = schedule(group_sizes, padded_rows, block_m)
    num_tiles = tile_group.shape[0]
    kernel = functools.partial(
        _gmm_kernel,
        num_tiles=num_tiles,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        group_m=group_m,
        transpose_rhs=transpose_rhs,
        precision=precision,
    )
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(num_tiles * (width // block_n),),
        in_specs=[whole(num_tiles), whole(num_tiles), whole(num_tiles), whole(*lhs_padded.shape), whole(*rhs.shape)],
        out_specs=whole(padded_rows, width),
        out_shape=jax.ShapeDtypeStruct((padded_rows, width), lhs.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gmm{'_t' if transpose_rhs else ''}_m{block_m}_n{block_n}_k{block_k}",
    )(tile_group, tile_start, tile_end, lhs_padded, rhs)
    return out[:num_rows]


@functools.partial(
    jax.jit,
    static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages", "precision", "interpret"),
)
def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int | None = None,
    num_stages: int = 3,
    precision=None,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.transposed_grouped_matmul`: `[G, K, N]` in lhs's dtype."""
    num_rows, depth = lhs.shape
    width = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    assert rhs.shape[0] == num_rows, (lhs.shape, rhs.shape)
    block_m = block_m or min(64 if lhs.dtype.itemsize <= 2 else 32, default_block_m(num_rows, num_groups))
    block_k, block_n = fit_block(depth, block_k), fit_block(width, block_n)
    if block_k is None or block_n is None:
        raise ValueError(f"no tile fits K={depth}, N={width}: both must be multiples of {MIN_BLOCK}")
    num_warps = num_warps or _warps(block_k, block_n)

    lhs, rhs = _pad_rows(lhs, block_m), _pad_rows(rhs, block_m)
    starts, ends = group_bounds(group_sizes, num_rows)
    kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n, precision=precision)
    whole = lambda *shape: pl.BlockSpec(shape, lambda k, n, g: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(depth // block_k, width // block_n, num_groups),
        in_specs=[whole(num_groups), whole(num_groups), whole(*lhs.shape), whole(*rhs.shape)],
        out_specs=whole(num_groups, depth, width),
        out_shape=jax.ShapeDtypeStruct((num_groups, depth, width), lhs.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"tgmm_m{block_m}_k{block_k}_n{block_n}",
    )(starts, ends, lhs, rhs)


# Differentiable op: the forward kernel, and the two kernels of its backward pass.

_OPTIONS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "precision", "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, options):
    return gmm(lhs, rhs, group_sizes, **dict(options))


def _grouped_matmul_fwd(lhs, rhs, group_sizes, options):
    return _grouped_matmul(lhs, rhs, group_sizes, options), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(options, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    options = dict(options)
    d_lhs = gmm(d_out, rhs, group_sizes, transpose_rhs=True, **options)  # contracts over N
    d_rhs = tgmm(lhs, d_out, group_sizes, **options)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    interpret: bool = False,
    **options,
) -> jax.Array:
    """Differentiable kernel version of `reference.grouped_matmul` (`jax.custom_vjp`).

    `options` apply to all three kernels (forward, input gradient, weight gradient), each
    taking its own defaults for those not given: `block_m`, `block_n`, `block_k` (upper bounds,
    cut to divide their dimensions), `num_warps`, `num_stages`, `precision` (as `pl.dot`; None
    is Triton's default, TF32 for float32 inputs on GPU).
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown grouped_matmul options {sorted(unknown)}")
    options = tuple(sorted({**options, "interpret": interpret}.items()))
    return _grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), options)
