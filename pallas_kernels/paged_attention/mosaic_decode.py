"""Decode paged attention as a Mosaic GPU (Pallas `mosaic_gpu`) kernel for Hopper.

A documented subset of `reference.paged_attention`: decode-only batches (token t is the one
new token of sequence t, so q is `[S, H, D]` with S = page_tables.shape[0]; rows at or past
`num_seqs` come out as zeros), plain causal attention with `scale` (no sliding window,
soft-cap, sinks or ALiBi), bfloat16/float16, head_dim a multiple of 64 up to 256, page size
64 or 128: one page is one KV step, and `P V` with P in registers needs K (the page) to be a
multiple of 64 for wgmma. Smaller pages need several pages per step (not built yet).

Design (after jax's bundled `attention_mgpu.py` / `decode_attention.py`): one program per
(kv head, sequence, KV split). Its G = H / K query heads are one 64-row wgmma tile (rows
past G are zero padding: decode is bound by reading the cache, not by the tensor cores).
The split's pages stream through shared memory by TMA, `max_concurrent_steps` pages deep
(`plgpu.emit_pipeline`), each page's TMA source row read from the page table; per page,
`S = Q K^T` and `acc += P V` are wgmma's with the online softmax between them in registers.
Steps past a sequence's last page re-read that page (an L2 hit) and are masked. Splits
(flash-decoding) give few sequences enough programs for the SMs; their partials
(acc, row max, row sum) are merged outside with `triton_kernel.merge_splits`.

Only lowered on this machine (no CUDA plugin): Mosaic GPU's interpreter cannot run it (jax
0.10.2 has no rule for the transposed K ref of `Q K^T`; 0.11.2 gets past that and fails on the
wgmma whose A operand, P, is in registers). A GPU checks it
(`tests/pallas_kernels/test_paged_attention.py`, `gpu`-marked) and times it
(`benchmarks/paged_attention.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_attention.reference import PagedMetadata
from pallas_kernels.paged_attention.triton_kernel import merge_splits

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ROWS = 64  # one wgmma tile of query rows per (kv head, sequence)
PAGE_SIZES = (64, 128)
MAX_SPLITS = 64
MAX_CONCURRENT_STEPS = 8
H100_SMS = 132
SMEM_BYTES = 227 * 1024  # shared memory one H100 block may use


def unsupported_reason(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       page_size: int, dtype) -> str | None:
    """Why the Mosaic decode kernel cannot run this call (None: it can)."""
    if num_tokens != num_seqs:
        return f"{num_tokens} tokens for {num_seqs} sequences (decode-only: one token per sequence)"
    if num_heads % num_kv_heads or num_heads // num_kv_heads > ROWS:
        return f"{num_heads} query heads over {num_kv_heads} kv heads (at most {ROWS} per kv head)"
    if head_dim % 64 or head_dim > 256:
        return f"head_dim {head_dim} (a multiple of 64 up to 256)"
    if page_size not in PAGE_SIZES:
        return f"page size {page_size} (one of {PAGE_SIZES})"
    if jnp.dtype(dtype) not in DTYPES:
        return f"dtype {dtype} (bfloat16 or float16)"
    if _smem_left(head_dim, jnp.dtype(dtype).itemsize) < 2 * page_size * head_dim * jnp.dtype(dtype).itemsize:
        return f"page size {page_size} x head_dim {head_dim} (one K and V page do not fit in shared memory)"
    return None


def _smem_left(head_dim: int, itemsize: int) -> int:
    """Shared memory left for K and V pages beside the q tile, the f32 output tile and row stats."""
    return SMEM_BYTES - ROWS * head_dim * (itemsize + 4) - 2 * ROWS * 4 - 4096  # barriers, 1 KiB alignments


def num_splits_for(num_seqs: int, num_kv_heads: int, pages: int) -> int:
    """KV splits so that (kv heads x sequences x splits) fills the SMs about twice, each split >= 4 pages."""
    want = pl.cdiv(2 * H100_SMS, num_seqs * num_kv_heads)
    return max(1, min(want, pages // 4, MAX_SPLITS))


def concurrent_steps(wanted: int, page_size: int, head_dim: int, itemsize: int) -> int:
    """Pipeline depth: `wanted`, cut so the K and V pages in flight fit beside the q and output tiles."""
    return max(1, min(wanted, _smem_left(head_dim, itemsize) // (2 * page_size * head_dim * itemsize)))


def _kernel(kv_lens_ref, tables_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, q_smem, o_smem, ml_smem, q_barrier,
            *, scale: float, page_size: int, pages_per_split: int, max_concurrent_steps: int):
    head, seq, split = lax.axis_index("head"), lax.axis_index("seq"), lax.axis_index("split")
    head_dim = q_ref.shape[-1]
    kv_len = kv_lens_ref[seq]
    last_page = jnp.maximum(pl.cdiv(kv_len, page_size) - 1, 0)
    first = split * pages_per_split

    plgpu.copy_gmem_to_smem(q_ref.at[seq, head], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)

    def page_row(j):  # the TMA row of step j's page in the [P * B, D] cache; past the end, the last page again
        return tables_ref[seq, jnp.minimum(first + j, last_page)]

    def step(indices, k_smem, v_smem, carry):
        acc, m_i, l_i = carry
        (j,) = indices

        def scores(ref):
            plgpu.wgmma(ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            return ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, page_size), jnp.float32)) * (scale * math.log2(math.e))
        position = lax.broadcasted_iota(jnp.int32, (ROWS, page_size), 1)
        s = jnp.where(position + (first + j) * page_size < kv_len, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a fully masked step keeps acc and l at 0
        alpha = jnp.exp2(m_i - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)

        def values(ref):  # a fresh accumulator (Mosaic GPU's interpreter has no run_state)
            plgpu.wgmma(ref, p.astype(v_smem.dtype), v_smem)
            return ref[...]

        pv = pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l_i

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    spec = plgpu.BlockSpec((page_size, head_dim), lambda j: (page_row(j), 0), transforms=transforms)
    carry = (jnp.zeros((ROWS, head_dim), jnp.float32), jnp.full((ROWS,), -jnp.inf, jnp.float32),
             jnp.zeros((ROWS,), jnp.float32))
    acc, m_i, l_i = plgpu.emit_pipeline(
        step, grid=(pages_per_split,), in_specs=[spec, spec], max_concurrent_steps=max_concurrent_steps,
        init_carry=carry,
    )(k_ref.at[head], v_ref.at[head])

    o_smem[...] = acc
    ml_smem[0] = m_i * math.log(2)  # back to natural-log units for merge_splits
    ml_smem[1] = l_i
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, acc_ref.at[seq, head, split])
    plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[seq, head, split])
    plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[seq, head, split])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "max_concurrent_steps", "interpret"))
def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    meta: PagedMetadata,
    *,
    scale: float,
    num_splits: int | None = None,
    max_concurrent_steps: int = 4,
    interpret=False,
) -> jax.Array:
    """Mosaic GPU version of `reference.paged_attention` for decode-only batches (module docstring); `[S, H, D]`.
    `max_concurrent_steps` (pages in flight) is cut to what shared memory holds."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_cache.shape
    num_seqs, max_pages = meta.page_tables.shape
    reason = unsupported_reason(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim, page_size, q.dtype)
    if reason:
        raise ValueError(f"the Mosaic decode attention does not cover {reason}")
    splits = num_splits or num_splits_for(num_seqs, num_kv_heads, max_pages)
    if not 1 <= splits <= MAX_SPLITS or not 1 <= max_concurrent_steps <= MAX_CONCURRENT_STEPS:
        raise ValueError(f"num_splits={splits} must be in [1, {MAX_SPLITS}], max_concurrent_steps="
                         f"{max_concurrent_steps} in [1, {MAX_CONCURRENT_STEPS}]")
    pages_per_split = pl.cdiv(max_pages, splits)
    max_concurrent_steps = concurrent_steps(max_concurrent_steps, page_size, head_dim, q.dtype.itemsize)
    groups = num_heads // num_kv_heads
    q_rows = jnp.pad(q.reshape(num_seqs, num_kv_heads, groups, head_dim), ((0, 0), (0, 0), (0, ROWS - groups), (0, 0)))
    # The caches flattened to [K, P * B, D]: block j of the page-sized BlockSpec is page j's rows.
    k_rows = k_cache.reshape(num_kv_heads, num_pages * page_size, head_dim)
    v_rows = v_cache.reshape(num_kv_heads, num_pages * page_size, head_dim)

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = plgpu.kernel(
        functools.partial(_kernel, scale=scale, page_size=page_size, pages_per_split=pages_per_split,
                          max_concurrent_steps=max_concurrent_steps),
        out_type=(
            jax.ShapeDtypeStruct((num_seqs, num_kv_heads, splits, ROWS, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_seqs, num_kv_heads, splits, ROWS), jnp.float32),
            jax.ShapeDtypeStruct((num_seqs, num_kv_heads, splits, ROWS), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((ROWS, head_dim), jnp.float32),
            plgpu.SMEM((2, ROWS), jnp.float32),
            plgpu.Barrier(num_barriers=1),
        ),
        grid=(num_kv_heads, num_seqs, splits),
        grid_names=("head", "seq", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name=f"paged_decode_mosaic_p{page_size}_d{head_dim}_s{splits}",
    )
    acc, m, l = kernel(meta.kv_lens, meta.page_tables, q_rows, k_rows, v_rows)
    out = merge_splits(acc, m, l)[:, :, :groups].reshape(num_seqs, num_heads, head_dim)
    valid = jnp.arange(num_seqs) < meta.num_seqs
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
