"""Ragged paged attention as a Triton-style Pallas kernel for NVIDIA GPUs.

Same contract as `reference.paged_attention` (the KV write happens before, as an
XLA scatter on the donated cache; see `ops.py`).

Work split: the step's queries are cut into q-blocks that never straddle two
sequences (`BLOCK_Q` tokens of one sequence). Program `(b, h)` takes q-block `b`
and kv head `h`, stacks the block's `BLOCK_Q x G` query rows (all query heads
sharing that kv head, so each KV page is loaded once per GQA group), and runs an
online softmax over the sequence's pages, `PAGES_PER_STEP` pages per iteration,
skipping pages that causality or the sliding window rule out. The grid has a
static upper bound of q-blocks (`T // BLOCK_Q + S`); programs past the real count
return at once. With ALiBi the slopes of the program's G query heads are loaded
once, and each row's bias `slope * (k_pos - q_pos)` is added to the soft-capped
logits inside the page loop.

Glossary: T tokens, S sequences, H query heads, K kv heads, G = H // K,
D head_dim, B page size, R = BLOCK_Q * G rows per program.

Triton needs power-of-two tile sides: D, B, G and R must be powers of two (ops.py
falls back to the reference otherwise). The Pallas Triton backend is deprecated
from jax 0.11 on (DESIGN.md); this kernel is the first, measured baseline for a
Mosaic GPU version.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention.reference import PagedMetadata

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported_reason(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> str | None:
    """Why the kernel cannot take these sizes, or None when it can."""
    sizes = dict(groups=num_heads // num_kv_heads, head_dim=head_dim, page_size=page_size)
    odd = [f"{name}={n}" for name, n in sizes.items() if not _is_pow2(n)]
    if odd:
        return f"{', '.join(odd)} not a power of two"
    if head_dim < 16:
        return f"head_dim={head_dim} < 16"
    return None


def supported(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> bool:
    """Whether the tile shapes this kernel needs exist for these sizes."""
    return unsupported_reason(num_heads, num_kv_heads, head_dim, page_size) is None


def _kernel(
    block_seq_ref,  # [NB] sequence of each q-block, -1 past the last
    block_start_ref,  # [NB] first token of each q-block
    cu_q_lens_ref,  # [S+1]
    kv_lens_ref,  # [S]
    page_tables_ref,  # [S, M_pad]
    sinks_ref,  # [H] or None
    alibi_ref,  # [H] or None
    q_ref,  # [T_pad * G, D] rows of this kv head
    k_ref,  # [P, B, D] pages of this kv head
    v_ref,  # [P, B, D]
    o_ref,  # [T_pad * G, D]
    *,
    block_q: int,
    groups: int,
    pages_per_step: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
):
    b, h = pl.program_id(0), pl.program_id(1)
    seq = block_seq_ref[b]

    @pl.when(seq >= 0)
    def _():
        page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
        block_k = pages_per_step * page_size
        rows = block_q * groups
        start = block_start_ref[b]
        q_start, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        first_pos = kv_len - (q_end - q_start)  # position of the sequence's first new token

        row_token = start + lax.broadcasted_iota(jnp.int32, (rows,), 0) // groups
        row_valid = row_token < q_end
        row_pos = first_pos + (row_token - q_start)

        q = q_ref[pl.ds(start * groups, rows), :]  # [R, D]
        last_pos = first_pos + (jnp.minimum(start + block_q, q_end) - 1 - q_start)
        hi = pl.cdiv(jnp.minimum(kv_len, last_pos + 1), block_k)
        lo = 0
        if sliding_window is not None:
            lo = jnp.maximum(first_pos + (start - q_start) - sliding_window + 1, 0) // block_k

        if sinks_ref is None:
            m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
            l0 = jnp.zeros((rows,), jnp.float32)
        else:
            sinks = sinks_ref[pl.ds(h * groups, groups)].astype(jnp.float32)  # [G]
            m0 = jnp.broadcast_to(sinks[None, :], (block_q, groups)).reshape(rows)
            l0 = jnp.ones((rows,), jnp.float32)  # exp(sink - m0)
        if alibi_ref is not None:
            slopes = alibi_ref[pl.ds(h * groups, groups)].astype(jnp.float32)  # [G]
            row_slope = jnp.broadcast_to(slopes[None, :], (block_q, groups)).reshape(rows)
        acc0 = jnp.zeros((rows, head_dim), jnp.float32)

        def body(step, carry):
            acc, m, l = carry
            pages = page_tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
            k = k_ref[pages].reshape(block_k, head_dim)
            v = v_ref[pages].reshape(block_k, head_dim)
            logits = pltriton.dot(q, k.T).astype(jnp.float32) * scale  # [R, block_k]
            if softcap is not None:
                logits = jnp.tanh(logits / softcap) * softcap
            kv_pos = step * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            if alibi_ref is not None:
                logits += row_slope[:, None] * (kv_pos - row_pos[:, None]).astype(jnp.float32)
            visible = (kv_pos <= row_pos[:, None]) & (kv_pos < kv_len)
            if sliding_window is not None:
                visible &= row_pos[:, None] - kv_pos < sliding_window
            logits = jnp.where(visible, logits, MASK_VALUE)
            m_next = jnp.maximum(m, logits.max(axis=-1))
            correction = jnp.exp2((m - m_next) * LOG2E)
            p = jnp.exp2((logits - m_next[:, None]) * LOG2E)
            l_next = l * correction + p.sum(axis=-1)
            acc = acc * correction[:, None] + pltriton.dot(p.astype(v.dtype), v).astype(jnp.float32)
            return acc, m_next, l_next

        acc, _, l = lax.fori_loop(lo, hi, body, (acc0, m0, l0))
        out = (acc / l[:, None]).astype(o_ref.dtype)
        pltriton.store(o_ref.at[pl.ds(start * groups, rows), :], out, mask=row_valid[:, None])


def q_blocks(cu_q_lens: jax.Array, num_tokens: int, block_q: int) -> tuple[jax.Array, jax.Array]:
    """Per q-block: its sequence (-1 if unused) and first token; static count T // BLOCK_Q + S."""
    num_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks_per_seq = (q_lens + block_q - 1) // block_q
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(blocks_per_seq).astype(jnp.int32)])
    block = jnp.arange(num_tokens // block_q + num_seqs, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], block, side="right"), num_seqs - 1).astype(jnp.int32)
    start = cu_q_lens[seq] + (block - cu_blocks[seq]) * block_q
    return jnp.where(block < cu_blocks[-1], seq, -1), start


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "softcap", "pages_per_step", "num_warps", "num_stages", "interpret"),
)
def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    meta: PagedMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
    pages_per_step: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.paged_attention`; `[T, H, D]`."""
    cu_q_lens, kv_lens, page_tables = meta.cu_q_lens, meta.kv_lens, meta.page_tables
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_cache.shape
    groups = num_heads // num_kv_heads
    block_q = max(1, 16 // groups)  # at least 16 rows: the smallest Triton dot tile
    rows = block_q * groups
    if pages_per_step is None:
        pages_per_step = max(1, 64 // page_size)
    pages_per_step = min(pages_per_step, pl.next_power_of_2(page_tables.shape[1]))

    # Rows grouped per kv head: [K, T_pad * G, D], padded so every block load stays in bounds.
    padded_tokens = num_tokens + block_q
    q_rows = q.reshape(num_tokens, num_kv_heads, groups, head_dim).transpose(1, 0, 2, 3)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, block_q), (0, 0), (0, 0))).reshape(num_kv_heads, padded_tokens * groups, head_dim)
    extra_pages = -page_tables.shape[1] % pages_per_step
    page_tables = jnp.pad(page_tables, ((0, 0), (0, extra_pages)))
    block_seq, block_start = q_blocks(cu_q_lens, num_tokens, block_q)

    kernel = functools.partial(
        _kernel,
        block_q=block_q,
        groups=groups,
        pages_per_step=pages_per_step,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    whole = lambda *shape: pl.BlockSpec(shape, lambda b, h: (0,) * len(shape))  # noqa: E731
    per_head = lambda *shape: pl.BlockSpec((None, *shape), lambda b, h: (h,) + (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(block_seq.shape[0], num_kv_heads),
        in_specs=[
            whole(*block_seq.shape),
            whole(*block_start.shape),
            whole(*cu_q_lens.shape),
            whole(*kv_lens.shape),
            whole(*page_tables.shape),
            None if sinks is None else whole(num_heads),
            None if alibi_slopes is None else whole(num_heads),
            per_head(padded_tokens * groups, head_dim),
            per_head(*k_cache.shape[1:]),
            per_head(*v_cache.shape[1:]),
        ],
        out_specs=per_head(padded_tokens * groups, head_dim),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_r{rows}_k{pages_per_step * page_size}",
    )(block_seq, block_start, cu_q_lens, kv_lens, page_tables, sinks, alibi_slopes, q_rows, k_cache, v_cache)

    out = out.reshape(num_kv_heads, padded_tokens, groups, head_dim)[:, :num_tokens]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    valid = jnp.arange(num_tokens) < cu_q_lens[meta.num_seqs]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
