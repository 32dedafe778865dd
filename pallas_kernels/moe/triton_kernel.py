"""Grouped (ragged) matmul as Triton-style Pallas kernels for NVIDIA GPUs.

Same contract as `reference.grouped_matmul` (see `ops.py`), plus the two kernels
of its backward pass, tied together by a `jax.custom_vjp` in `grouped_matmul`.

gmm (`lhs [M, K] x rhs [G, K, N] -> [M, N]`, also the input gradient with
`transpose_rhs`, where rhs is read as `[G, N, K]` without a transposed copy): the
rows are cut into row tiles of `BLOCK_M` rows on a fixed grid (tile t holds rows
`[t * BLOCK_M, (t + 1) * BLOCK_M)`), so every load starts at a multiple of BLOCK_M.
A tile that holds rows of several groups is visited once per group; each visit
stores only its group's rows (disjoint masks, so every output row has one writer).
Rows past `sum(group_sizes)` form one more pseudo-group whose visits store zeros.
The visit -> (group, tile, group rows) schedule is computed on device from
group_sizes with a static length `cdiv(M, BLOCK_M) + G`, a bound on the real visit
count (`schedule`); programs past the real count return at once. Each program
computes one `[BLOCK_M, BLOCK_N]` output tile with a K loop of static length
(pipelined `num_stages` deep), float32 accumulation, and a masked store. The 1-D
grid walks (visit, N tile) in supergroups of `GROUP_M` visits (the Triton matmul
swizzle), so neighbouring programs share lhs row tiles and rhs column tiles in L2.

tgmm (`lhs [M, K], rhs [M, N] -> [G, K, N]`, `out[g] = lhs_g^T @ rhs_g`, the
weight gradient): program `(k, n, g)` owns one `[BLOCK_K, BLOCK_N]` tile of
`out[g]` and loops over the row tiles of the grid that hold the group's rows,
loading only the group's rows (masked loads fill the others with zeros, so rows
past the groups may hold anything). A group without rows stores zeros.

Block sizes come from the shape (`gmm_config`, `tgmm_config`): decode-sized
problems (few rows per group) take 16-row tiles with long K steps and deep
pipelining (they are bound by reading the weights); prefill-sized ones take
128-row tiles on 8 warps, which Triton turns into Hopper wgmma. Triton needs
power-of-two tile sides of at least 16: K and N must be multiples of 16
(`supported`; ops.py falls back to `jax.lax.ragged_dot` otherwise). M is padded to
a whole number of row tiles.

Loop bounds are computed with integer arithmetic, never `jnp.where(pred, n, 0)`:
jax's Triton lowering types such literal branches as the predicate's i1, which made
the old K loop's bound a boolean (invalid IR).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.moe.reference import group_bounds
from pallas_kernels.triton_tiles import DTYPES, MIN_BLOCK, BlockConfig, fit_block


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


def _clamp_pow2(n: int, low: int, high: int) -> int:
    return min(high, max(low, pl.next_power_of_2(max(1, n))))


def gmm_config(num_rows: int, depth: int, width: int, num_groups: int, itemsize: int) -> BlockConfig:
    """Tiles for `[M, depth] x [G, depth, width]` (the forward and the input gradient).

    Groups of 64+ rows on average: 128 x 128(256) tiles on 8 warps (wgmma, compute-bound).
    Smaller groups: a row tile near the average group size (less of it wasted on rows of
    other groups) and long K steps, 4 stages deep: such calls are bound by reading the weights.
    """
    rows_per_group = max(1, num_rows // num_groups)
    wide = itemsize <= 2
    if rows_per_group >= 64 and num_rows >= 128:
        return BlockConfig(128, fit_block(width, 256 if wide else 128), fit_block(depth, 64 if wide else 32), 8,
                           3 if wide else 2)
    block_m = _clamp_pow2(rows_per_group, MIN_BLOCK, 64)
    return BlockConfig(block_m, fit_block(width, 64), fit_block(depth, 128 if wide else 64), 4, 4 if wide else 3)


def tgmm_config(num_rows: int, depth: int, width: int, num_groups: int, itemsize: int) -> BlockConfig:
    """Tiles for the weight gradient: `[BLOCK_K, BLOCK_N]` output tiles (the dot's M side is BLOCK_K,
    so 128 gives wgmma), contracting BLOCK_M rows per step."""
    wide = itemsize <= 2
    block_m = _clamp_pow2(num_rows // num_groups, MIN_BLOCK, 64 if wide else 32)
    return BlockConfig(block_m, fit_block(width, 128), fit_block(depth, 128 if wide else 64), 8, 3)


def _override(config: BlockConfig, **given) -> BlockConfig:
    """The config with the caller's options (None: keep), block sizes cut to divide their dimensions."""
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


def schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, ...]:
    """Visits of row-grid tiles by the groups whose rows they hold: per visit its group (G for the
    zero tail past the groups, -1 for an unused visit), its row tile, and its group's first and end row.

    Static length `cdiv(M, BLOCK_M) + G`: G groups and the tail split M rows into G + 1 pieces,
    and pieces that share a tile visit it once each: at most `tiles + pieces - 1` visits.
    """
    num_groups = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    piece_start = jnp.concatenate([starts, ends[-1:]])  # [G + 1]: the groups, then the tail
    piece_end = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    first_tile = piece_start // block_m
    nonempty = (piece_end > piece_start).astype(jnp.int32)
    tiles = nonempty * ((piece_end - 1) // block_m - first_tile + 1)
    cu_tiles = jnp.cumsum(tiles).astype(jnp.int32)
    visit = jnp.arange(pl.cdiv(num_rows, block_m) + num_groups, dtype=jnp.int32)
    piece = jnp.minimum(jnp.searchsorted(cu_tiles, visit, side="right"), num_groups).astype(jnp.int32)
    tile = first_tile[piece] + visit - (cu_tiles[piece] - tiles[piece])
    return jnp.where(visit < cu_tiles[-1], piece, -1), tile, piece_start[piece], piece_end[piece]


def _gmm_kernel(
    visit_group_ref,  # [V] group of each visit; G: zero tail; -1: unused
    visit_tile_ref,  # [V] row tile of each visit
    visit_start_ref,  # [V] first row of the visit's group
    visit_end_ref,  # [V] end row of the visit's group
    lhs_ref,  # [M_pad, K]
    rhs_ref,  # [G, K, N], or [G, N, K] with transpose_rhs
    out_ref,  # [M_pad, N]
    *,
    num_visits: int,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int,
    transpose_rhs: bool,
    precision,
):
    depth = lhs_ref.shape[1]
    num_groups = rhs_ref.shape[0]
    num_n = out_ref.shape[1] // block_n
    # Swizzle: GROUP_M visits x all N tiles, visit fastest.
    pid = pl.program_id(0)
    width = group_m * num_n
    first_visit = (pid // width) * group_m
    height = jnp.minimum(num_visits - first_visit, group_m)
    visit = first_visit + (pid % width) % height
    n = (pid % width) // height
    group = visit_group_ref[visit]
    row0 = pl.multiple_of(visit_tile_ref[visit] * block_m, block_m)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    mine = ((rows >= visit_start_ref[visit]) & (rows < visit_end_ref[visit]))[:, None]
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    out = out_ref.at[pl.ds(row0, block_m), cols]

    @pl.when((group >= 0) & (group < num_groups))
    def _():
        def body(step, acc):
            ks = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
            a = lhs_ref[pl.ds(row0, block_m), ks]
            if transpose_rhs:
                b = rhs_ref[group, cols, ks]  # [BLOCK_N, BLOCK_K]
                return acc + pltriton.dot(a, b, trans_b=True, precision=precision).astype(jnp.float32)
            b = rhs_ref[group, ks, cols]  # [BLOCK_K, BLOCK_N]
            return acc + pltriton.dot(a, b, precision=precision).astype(jnp.float32)

        acc = lax.fori_loop(0, depth // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        pltriton.store(out, acc.astype(out_ref.dtype), mask=mine)

    @pl.when(group == num_groups)  # rows past the groups
    def _():
        pltriton.store(out, jnp.zeros((block_m, block_n), out_ref.dtype), mask=mine)


def _tgmm_kernel(
    group_start_ref,  # [G]
    group_end_ref,  # [G]
    lhs_ref,  # [M_pad, K]
    rhs_ref,  # [M_pad, N]
    out_ref,  # [G, K, N]
    *,
    block_m: int,
    block_k: int,
    block_n: int,
    precision,
):
    k, n, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = group_start_ref[g], group_end_ref[g]
    first_tile = start // block_m
    steps = (end > start).astype(jnp.int32) * ((end - 1) // block_m - first_tile + 1)
    ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    ns = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    def body(step, acc):
        row0 = pl.multiple_of((first_tile + step) * block_m, block_m)
        rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        mine = ((rows >= start) & (rows < end))[:, None]
        a = pltriton.load(lhs_ref.at[pl.ds(row0, block_m), ks], mask=mine, other=0)
        b = pltriton.load(rhs_ref.at[pl.ds(row0, block_m), ns], mask=mine, other=0)
        return acc + pltriton.dot(a, b, trans_a=True, precision=precision).astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[g, ks, ns] = acc.astype(out_ref.dtype)


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    extra = -x.shape[0] % multiple
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def _check_blocks(config: BlockConfig, depth: int, width: int) -> BlockConfig:
    block_k, block_n = fit_block(depth, config.block_k), fit_block(width, config.block_n)
    if block_k is None or block_n is None:
        raise ValueError(f"no tile fits K={depth}, N={width}: both must be multiples of {MIN_BLOCK}")
    return dataclasses.replace(config, block_k=block_k, block_n=block_n)


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
    block_n: int | None = None,
    block_k: int | None = None,
    group_m: int = 8,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision=None,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.grouped_matmul`; `[M, N]` in lhs's dtype.

    With `transpose_rhs`, rhs is `[G, N, K]` and group g multiplies by `rhs[g].T`. Settings not
    given come from `gmm_config`; block sizes are upper bounds, cut to divide their dimensions.
    """
    num_rows, depth = lhs.shape
    num_groups = rhs.shape[0]
    width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    assert (rhs.shape[2] if transpose_rhs else rhs.shape[1]) == depth, (lhs.shape, rhs.shape, transpose_rhs)
    config = gmm_config(num_rows, depth, width, num_groups, lhs.dtype.itemsize)
    config = _override(config, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                       num_stages=num_stages)
    config = _check_blocks(config, depth, width)
    block_m = config.block_m

    lhs_padded = pad_rows(lhs, block_m)
    padded_rows = lhs_padded.shape[0]
    visit_group, visit_tile, visit_start, visit_end = schedule(group_sizes, padded_rows, block_m)
    num_visits = visit_group.shape[0]
    kernel = functools.partial(
        _gmm_kernel,
        num_visits=num_visits,
        block_m=block_m,
        block_n=config.block_n,
        block_k=config.block_k,
        group_m=group_m,
        transpose_rhs=transpose_rhs,
        precision=precision,
    )
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(num_visits * (width // config.block_n),),
        in_specs=[whole(num_visits)] * 4 + [whole(*lhs_padded.shape), whole(*rhs.shape)],
        out_specs=whole(padded_rows, width),
        out_shape=jax.ShapeDtypeStruct((padded_rows, width), lhs.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"gmm{'_t' if transpose_rhs else ''}_m{block_m}_n{config.block_n}_k{config.block_k}",
    )(visit_group, visit_tile, visit_start, visit_end, lhs_padded, rhs)
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
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision=None,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.transposed_grouped_matmul`: `[G, K, N]` in lhs's dtype."""
    num_rows, depth = lhs.shape
    width = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    assert rhs.shape[0] == num_rows, (lhs.shape, rhs.shape)
    config = tgmm_config(num_rows, depth, width, num_groups, lhs.dtype.itemsize)
    config = _override(config, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                       num_stages=num_stages)
    config = _check_blocks(config, depth, width)

    lhs, rhs = pad_rows(lhs, config.block_m), pad_rows(rhs, config.block_m)
    starts, ends = group_bounds(group_sizes, num_rows)
    kernel = functools.partial(_tgmm_kernel, block_m=config.block_m, block_k=config.block_k, block_n=config.block_n,
                               precision=precision)
    whole = lambda *shape: pl.BlockSpec(shape, lambda k, n, g: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(depth // config.block_k, width // config.block_n, num_groups),
        in_specs=[whole(num_groups), whole(num_groups), whole(*lhs.shape), whole(*rhs.shape)],
        out_specs=whole(num_groups, depth, width),
        out_shape=jax.ShapeDtypeStruct((num_groups, depth, width), lhs.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"tgmm_m{config.block_m}_k{config.block_k}_n{config.block_n}",
    )(starts, ends, lhs, rhs)


# Differentiable op: the forward kernel, and the two kernels of its backward pass.

_OPTIONS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "precision", "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, options):
    return gmm(lhs, rhs, group_sizes, **dict(options))


def _grouped_matmul_fwd(lhs, rhs, group_sizes, options):
    return _grouped_matmul(lhs, rhs, group_sizes, options), (lhs, rhs, group_sizes)


def grouped_matmul_bwd(options, residuals, d_out):
    """The custom VJP's backward (shared with `mosaic_kernel.grouped_matmul`): `options` as a tuple of pairs."""
    lhs, rhs, group_sizes = residuals
    options = dict(options)
    d_lhs = gmm(d_out, rhs, group_sizes, transpose_rhs=True, **options)  # contracts over N
    d_rhs = tgmm(lhs, d_out, group_sizes, **options)
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, grouped_matmul_bwd)


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
