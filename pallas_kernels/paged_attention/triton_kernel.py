"""Ragged paged attention as a Triton-style Pallas kernel for NVIDIA GPUs.

Same contract as `reference.paged_attention` (the KV write happens before, as an
XLA scatter on the donated cache; see `ops.py`).

Work split: per kv head, the step's queries are flattened to rows `token * G + g`
(the G query heads sharing that kv head, so each KV page is loaded once per GQA
group) and cut into q-blocks of `R` rows that never straddle two sequences. Any G
works: a block's rows need not align with tokens. Program `(b, h, s)` takes q-block
`b`, kv head `h` and KV split `s`, and runs an online softmax over its share of the
sequence's pages, `BLOCK_K` tokens per iteration (`BLOCK_K // B` pages), skipping
pages that causality, the sliding window or the attention chunk rule out, pipelined
`num_stages` deep. With bidirectional spans (`meta.visible_until`) each row's causal limit is its
`visible_until` and a q-block's key loop runs to the largest of its rows'.
The grid has a static upper bound of q-blocks (`T * G // R + S`); programs past the
real count return at once.

Shapes picked from the step (`block_config`): decode-like steps (about one token per
sequence) take `R = max(16, G)` rows, prefill chunks 64-row tiles (tensor-core sized,
so a chunk reads each KV page once per 64 / G tokens). When there are few sequences
(decode at small batch), the KV range is split across `num_splits` programs
(flash-decoding) that write unnormalised partial outputs with their row max and sum;
a log-sum-exp merge in XLA combines them. Sinks join split 0's softmax; ALiBi adds
`slope[h] * (k_pos - q_pos)` per row after the soft-cap.

Quantized pages (`kv_quant.QuantizedPages`: int8 / float8 values, one float32 scale per
token slot and kv head) are loaded as stored and converted to q's dtype (exact: int8 and
float8 values are bfloat16 numbers); their scales are per key, so they multiply the
logits' columns (K) and the probabilities' columns before the PV product (V) inside the
loop, instead of every element of the tiles.

Latent pages (MLA's absorbed form, `value_dim`, FlashMLA style): one kv head of width
D = kv_lora_rank + qk_rope_head_dim (576 at DeepSeek-V3 shape) and no V pool; V is the
first `value_dim` columns of the same tile. Every key tile is loaded once per q-block
as two column parts, `[0, value_dim)` and `[value_dim, D)` (512 and 64 wide), the logits
are the sum of the two parts' products, and the PV product reuses the first part, so all
the heads of a q-block share one read of each latent page. With G = H (one kv head)
a q-block's rows are heads of consecutive tokens; rows are capped at 32 and 8 warps run
each program so the float32 accumulator `[R, 512]` stays in registers (no spills at 512 + 64,
int8 pages included: the CUDA lowering test); decode steps split the KV range as above. These
tiles use mma.sync, not wgmma (64-row tiles, FlashMLA's choice, would need the accumulator split
over two warp groups); not yet timed on a GPU (`benchmarks/mla_attention.py`).

Triton needs power-of-two tile sides: head_dim is padded to the next power of two
inside the kernel (masked gather loads from the unpadded cache, masked columns
dropped on the way out); page sizes must be powers of two (8 to 128 are the serving
ones). Pallas computes a ref's element offsets in 64 bits only when the whole array
exceeds 2^32 bytes (`_compute_offsets_from_indices` in jax's Triton lowering), so a
pool of 2^31 or more elements that still fits in 4 GiB (1-byte values) would
overflow and is refused (`unsupported_reason`); a layer stack's folded pool
(`reference.layer_pages`) is one such array. The Pallas Triton backend is deprecated from jax 0.11 on
(DESIGN.md); this kernel is the measured baseline for a Mosaic GPU version.

Glossary: T tokens, S sequences, H query heads, K kv heads, G = H // K,
D head_dim (Dp padded), B page size, R rows per program, NS KV splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention.kv_quant import Pages, QuantizedPages, page_values
from pallas_kernels.paged_attention.reference import PagedMetadata, check_value_layout

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
NUM_SMS = 132  # H100 / H200 SXM multiprocessors: the split-KV target is two programs per SM
MAX_SPLITS = 16
MAX_OFFSET = 2**31  # signed 32-bit element offsets, used by Pallas for arrays of up to 2^32 bytes


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


MAX_LATENT_DIM = 512  # widest value part of latent pages (the accumulator's width)
LATENT_ROWS = 32  # most q rows per program over latent pages: a [32, 512] float32 accumulator


def column_parts(head_dim: int, value_dim: int | None) -> tuple[tuple[int, int, int], ...]:
    """The column parts each key tile is loaded in: `(first column, width, padded width)`; one part for
    K/V pools, the value part and the rest for latent pages."""
    bounds = (0, head_dim) if value_dim is None or value_dim == head_dim else (0, value_dim, head_dim)
    return tuple((lo, hi - lo, max(16, pl.next_power_of_2(hi - lo))) for lo, hi in zip(bounds, bounds[1:]))


def unsupported_reason(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                       cache_elements: int = 0, itemsize: int = 2, value_dim: int | None = None) -> str | None:
    """Why the kernel cannot take these sizes, or None when it can (`value_dim`: latent pages)."""
    if num_heads % num_kv_heads:
        return f"{num_heads} heads are not a multiple of {num_kv_heads} kv heads"
    if not _is_pow2(page_size):
        return f"page_size={page_size} is not a power of two"
    if value_dim is not None:
        rest = head_dim - value_dim
        if value_dim < 16 or value_dim > MAX_LATENT_DIM or rest > 256:
            return f"latent pages of {value_dim} + {rest} columns are outside 16..{MAX_LATENT_DIM} + 0..256"
    elif head_dim < 16 or head_dim > 256:
        return f"head_dim={head_dim} is outside 16..256"
    if cache_elements >= MAX_OFFSET and cache_elements * itemsize <= 2**32:
        return f"a cache of {cache_elements} >= 2^31 elements in <= 4 GiB (32-bit offsets)"
    return None


def supported(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> bool:
    """Whether the tile shapes this kernel needs exist for these sizes."""
    return unsupported_reason(num_heads, num_kv_heads, head_dim, page_size) is None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    rows: int  # R: query rows (token x head) per program
    block_k: int  # KV tokens per iteration
    num_splits: int  # KV splits per q-block (1: no merge)
    num_warps: int
    num_stages: int


def _decode_splits(busy_programs: int, kv_tokens: int, block_k: int) -> int:
    """KV splits (flash-decoding) that bring a decode step to about two programs per SM."""
    splits = pl.next_power_of_2(-(-2 * NUM_SMS // max(1, busy_programs)))
    kv_steps = max(1, kv_tokens // block_k)
    while splits > 1 and splits > kv_steps:
        splits //= 2
    return min(splits, MAX_SPLITS)


def block_config(num_tokens: int, num_seqs: int, num_kv_heads: int, groups: int, head_dim: int, page_size: int,
                 max_pages: int, value_dim: int | None = None) -> BlockConfig:
    """Tile shapes for one step's static shapes (see the module docstring)."""
    decode = num_tokens <= 2 * num_seqs  # decode-like: about one token per sequence
    if value_dim is not None:  # latent pages: a [rows, 512] accumulator and [32, 576] key tiles; 8 warps: no spills
        rows = min(LATENT_ROWS, max(16, pl.next_power_of_2(groups))) if decode else LATENT_ROWS
        splits = _decode_splits(num_seqs * -(-groups // rows), max_pages * page_size, 32) if decode else 1
        return BlockConfig(rows, 32, splits, 8, 2)
    padded_dim = max(16, pl.next_power_of_2(head_dim))
    block_k = 64 if padded_dim > 128 else 128  # a slice of a page when pages are larger
    if decode:
        rows = max(16, pl.next_power_of_2(groups))
        return BlockConfig(rows, block_k, _decode_splits(num_seqs * num_kv_heads, max_pages * page_size, block_k), 4, 3)
    return BlockConfig(64, min(block_k, 64), 1, 8 if padded_dim > 128 else 4, 2)  # 8 warps: no spills at D 256


def _kernel(
    block_seq_ref,  # [NB] sequence of each q-block, -1 past the last
    block_row_ref,  # [NB] first row (token * G + g) of each q-block
    cu_q_lens_ref,  # [S+1]
    kv_lens_ref,  # [S]
    page_tables_ref,  # [S, M_pad]
    sinks_ref,  # [H] or None
    alibi_ref,  # [H] or None
    visible_ref,  # [T] last key position each token sees (bidirectional spans), or None: causal
    q_ref,  # [T * G + R, D] rows of this kv head
    k_ref,  # [P, B, D] pages of this kv head
    v_ref,  # [P, B, D], or None over latent pages (V: the first part of K)
    k_scale_ref,  # [P, B] scales of quantized pages, or None
    v_scale_ref,  # [P, B] or None (latent pages: k_scale_ref again)
    o_ref,  # [NS, T * G + R, Dp]: the output, or with splits the unnormalised partial outputs
    m_ref,  # [NS, T * G + R] row max per split, or None without splits
    l_ref,  # [NS, T * G + R] row sum per split, or None
    *,
    rows: int,
    groups: int,
    block_k: int,
    num_splits: int,
    parts: tuple[tuple[int, int, int], ...],
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    chunk_size: int | None,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq = block_seq_ref[b]

    @pl.when(seq >= 0)
    def _():
        page_size = k_ref.shape[1]
        pages_per_step = max(1, block_k // page_size)
        row0 = block_row_ref[b]
        q_start, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        first_pos = kv_len - (q_end - q_start)  # position of the sequence's first new token

        row = row0 + lax.broadcasted_iota(jnp.int32, (rows,), 0)
        row_valid = row < q_end * groups
        row_head = row % groups
        row_pos = first_pos + (row // groups - q_start)
        last_row = jnp.minimum(row0 + rows, q_end * groups) - 1
        keys_end = first_pos + last_row // groups - q_start + 1  # one past the last key any row sees
        row_last_key = row_pos
        if visible_ref is not None:  # a row in a span sees keys past its own position
            token = jnp.minimum(row // groups, visible_ref.shape[0] - 1)
            row_last_key = jnp.where(row_valid, visible_ref[token], row_pos)
            keys_end = jnp.maximum(keys_end, jnp.max(jnp.where(row_valid, row_last_key, 0)) + 1)
        hi = pl.cdiv(jnp.minimum(kv_len, keys_end), block_k)
        lo = 0
        if sliding_window is not None:
            lo = jnp.maximum(first_pos + row0 // groups - q_start - sliding_window + 1, 0) // block_k
        if chunk_size is not None:  # the first row's chunk starts here; later rows' chunks start later
            chunk_start = (first_pos + row0 // groups - q_start) // chunk_size * chunk_size
            lo = jnp.maximum(lo, chunk_start // block_k)
        per_split = pl.cdiv(hi - lo, num_splits)
        split_lo = lo + split * per_split
        split_hi = jnp.minimum(hi, split_lo + per_split)

        def load_q(part):
            """This block's query rows, the columns of one part `[R, part width padded]`."""
            col0, width, padded = part
            if (col0, width, padded) == (0, q_ref.shape[1], width):
                return q_ref[pl.ds(row0, rows), :]  # [R, D]
            cols = lax.broadcasted_iota(jnp.int32, (rows, padded), 1)
            q_rows = row0 + lax.broadcasted_iota(jnp.int32, (rows, padded), 0)
            mask = None if padded == width else cols < width
            return pltriton.load(q_ref.at[q_rows, col0 + jnp.minimum(cols, width - 1)], mask=mask,
                                 other=None if mask is None else 0)

        qs = [load_q(part) for part in parts]
        q = qs[0]

        def load_kv(ref, step, part):
            """The step's BLOCK_K tokens, one column part `[BLOCK_K, width padded]`: whole pages, or a slice
            of one page when pages are larger than a step."""
            col0, width, padded = part
            whole_rows = (col0, width, padded) == (0, ref.shape[2], width)
            if block_k >= page_size:
                pages = page_tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
                shape = (pages_per_step, page_size, padded)
                page = jnp.broadcast_to(pages[:, None, None], shape)
                slot = lax.broadcasted_iota(jnp.int32, shape, 1)
            else:
                page = page_tables_ref[seq, (step * block_k) // page_size]
                shape = (block_k, padded)
                slot = (step * block_k) % page_size + lax.broadcasted_iota(jnp.int32, shape, 0)
            if whole_rows and block_k >= page_size:
                return ref[pages].reshape(block_k, width)
            if padded == width and block_k < page_size:
                first = pl.multiple_of((step * block_k) % page_size, block_k)
                return ref[page, pl.ds(first, block_k), pl.ds(col0, width)]
            dim = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
            mask = None if padded == width else dim < width
            zero = 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0  # Triton casts no integer to float8
            tile = pltriton.load(ref.at[page, slot, col0 + jnp.minimum(dim, width - 1)], mask=mask,
                                 other=None if mask is None else zero)
            return tile.reshape(block_k, padded)

        def load_tile(ref, step, part):
            """`load_kv` in q's dtype (quantized and other-dtype pages are converted)."""
            tile = load_kv(ref, step, part)
            return tile if tile.dtype == q.dtype else tile.astype(q.dtype)

        def load_scales(ref, step):
            """The step's BLOCK_K per-token scales `[BLOCK_K]` (float32)."""
            if block_k >= page_size:
                pages = page_tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
                return ref[pages].reshape(block_k)
            page = page_tables_ref[seq, (step * block_k) // page_size]
            return ref[page, pl.ds(pl.multiple_of((step * block_k) % page_size, block_k), block_k)]

        first_split = split == 0
        if sinks_ref is None:
            m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
            l0 = jnp.zeros((rows,), jnp.float32)
        else:
            sinks = sinks_ref[h * groups + row_head].astype(jnp.float32)  # [R]
            m0 = jnp.where(first_split, sinks, jnp.full_like(sinks, MASK_VALUE))
            l0 = jnp.where(first_split, jnp.ones_like(sinks), jnp.zeros_like(sinks))  # exp(sink - m0)
        if alibi_ref is not None:
            row_slope = alibi_ref[h * groups + row_head].astype(jnp.float32)  # [R]
        acc0 = jnp.zeros((rows, parts[0][2]), jnp.float32)

        def body(step, carry):
            acc, m, l = carry
            ks = [load_tile(k_ref, step, part) for part in parts]
            v = ks[0] if v_ref is None else load_tile(v_ref, step, parts[0])  # latent pages: V is K's first part
            logits = pltriton.dot(qs[0], ks[0].T).astype(jnp.float32)
            for q_part, k_part in zip(qs[1:], ks[1:]):
                logits += pltriton.dot(q_part, k_part.T).astype(jnp.float32)
            logits *= scale  # [R, block_k]
            if k_scale_ref is not None:
                logits *= load_scales(k_scale_ref, step)[None, :]
            if softcap is not None:
                logits = jnp.tanh(logits / softcap) * softcap
            kv_pos = step * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            if alibi_ref is not None:
                logits += row_slope[:, None] * (kv_pos - row_pos[:, None]).astype(jnp.float32)
            visible = (kv_pos <= row_last_key[:, None]) & (kv_pos < kv_len)
            if sliding_window is not None:
                visible &= row_pos[:, None] - kv_pos < sliding_window
            if chunk_size is not None:
                visible &= kv_pos // chunk_size == row_pos[:, None] // chunk_size
            logits = jnp.where(visible, logits, MASK_VALUE)
            m_next = jnp.maximum(m, logits.max(axis=-1))
            correction = jnp.exp2((m - m_next) * LOG2E)
            p = jnp.exp2((logits - m_next[:, None]) * LOG2E)
            l_next = l * correction + p.sum(axis=-1)
            if v_scale_ref is not None:
                p *= load_scales(v_scale_ref, step)[None, :]
            acc = acc * correction[:, None] + pltriton.dot(p.astype(v.dtype), v).astype(jnp.float32)
            return acc, m_next, l_next

        acc, m, l = lax.fori_loop(split_lo, split_hi, body, (acc0, m0, l0))
        out_rows = pl.ds(row0, rows)
        if m_ref is None:
            out = (acc / l[:, None]).astype(o_ref.dtype)
            pltriton.store(o_ref.at[split, out_rows, :], out, mask=row_valid[:, None])
        else:
            pltriton.store(o_ref.at[split, out_rows, :], acc, mask=row_valid[:, None])
            pltriton.store(m_ref.at[split, out_rows], m, mask=row_valid)
            pltriton.store(l_ref.at[split, out_rows], l, mask=row_valid)


def q_blocks(cu_q_lens: jax.Array, num_tokens: int, groups: int, rows: int) -> tuple[jax.Array, jax.Array]:
    """Per q-block: its sequence (-1 if unused) and first row; static count T * G // R + S."""
    num_seqs = cu_q_lens.shape[0] - 1
    q_rows = (cu_q_lens[1:] - cu_q_lens[:-1]) * groups
    blocks_per_seq = (q_rows + rows - 1) // rows
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(blocks_per_seq).astype(jnp.int32)])
    block = jnp.arange(num_tokens * groups // rows + num_seqs, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], block, side="right"), num_seqs - 1).astype(jnp.int32)
    first_row = cu_q_lens[seq] * groups + (block - cu_blocks[seq]) * rows
    return jnp.where(block < cu_blocks[-1], seq, -1), first_row


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Log-sum-exp merge of split partials `acc [..., NS, R, D]`, `m, l [..., NS, R]` -> `[..., R, D]`."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    weight = jnp.exp(m - m_max)  # [..., NS, R]
    total = jnp.sum(weight * l, axis=-2)
    return jnp.sum(weight[..., None] * acc, axis=-3) / total[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "softcap", "chunk_size", "value_dim", "rows", "block_k", "num_splits", "num_warps", "num_stages",
                     "interpret"),
)
def paged_attention(
    q: jax.Array,
    k_cache: Pages,
    v_cache: Pages,
    meta: PagedMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
    chunk_size: int | None = None,
    value_dim: int | None = None,
    rows: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of `reference.paged_attention`; `[T, H, D]` (`[T, H, value_dim]` over latent pages,
    `v_cache` None). Settings not given come from `block_config`. Caches may be quantized
    (`kv_quant.QuantizedPages`). `meta.visible_until`: bidirectional spans (a q-block reads keys up to the
    largest of its rows' `visible_until`)."""
    cu_q_lens, kv_lens, page_tables = meta.cu_q_lens, meta.kv_lens, meta.page_tables
    visible_until = meta.visible_until
    num_tokens, num_heads, head_dim = q.shape
    check_value_layout(v_cache, value_dim, head_dim)
    k_scales = k_cache.scales if isinstance(k_cache, QuantizedPages) else None
    v_scales = v_cache.scales if isinstance(v_cache, QuantizedPages) else None
    if v_cache is None:
        v_scales = k_scales  # latent pages: one scale per token covers its whole vector
    k_cache, v_cache = page_values(k_cache), None if v_cache is None else page_values(v_cache)
    num_kv_heads, _, page_size, _ = k_cache.shape
    groups = num_heads // num_kv_heads
    reason = unsupported_reason(num_heads, num_kv_heads, head_dim, page_size, k_cache.size, k_cache.dtype.itemsize,
                                value_dim)
    if reason:
        raise ValueError(f"paged attention kernel: {reason}")
    config = block_config(num_tokens, cu_q_lens.shape[0] - 1, num_kv_heads, groups, head_dim, page_size,
                          page_tables.shape[1], value_dim)
    given = dict(rows=rows, block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
    rows, block_k, splits = config.rows, config.block_k, config.num_splits
    parts = column_parts(head_dim, value_dim)
    out_dim, padded_dim = parts[0][1], parts[0][2]

    # Rows grouped per kv head: [K, T * G + R, D], padded so every block load stays in bounds.
    total_rows = num_tokens * groups + rows
    q_rows = q.reshape(num_tokens, num_kv_heads, groups, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(num_kv_heads, num_tokens * groups, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, rows), (0, 0)))
    pages_per_step = max(1, block_k // page_size)
    extra_pages = -page_tables.shape[1] % pages_per_step
    page_tables = jnp.pad(page_tables, ((0, 0), (0, extra_pages)))
    block_seq, block_row = q_blocks(cu_q_lens, num_tokens, groups, rows)

    kernel = functools.partial(
        _kernel,
        rows=rows,
        groups=groups,
        block_k=block_k,
        num_splits=splits,
        parts=parts,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    whole = lambda *shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))  # noqa: E731
    per_head = lambda *shape: pl.BlockSpec((None, *shape), lambda b, h, s: (h,) + (0,) * len(shape))  # noqa: E731
    out_dtype = q.dtype if splits == 1 else jnp.float32
    out_shapes = [jax.ShapeDtypeStruct((num_kv_heads, splits, total_rows, padded_dim), out_dtype)]
    out_specs = [per_head(splits, total_rows, padded_dim)]
    if splits > 1:
        out_shapes += [jax.ShapeDtypeStruct((num_kv_heads, splits, total_rows), jnp.float32)] * 2
        out_specs += [per_head(splits, total_rows)] * 2
    outs = pl.pallas_call(
        kernel if splits > 1 else functools.partial(_no_split_outputs, kernel),
        grid=(block_seq.shape[0], num_kv_heads, splits),
        in_specs=[
            whole(*block_seq.shape),
            whole(*block_row.shape),
            whole(*cu_q_lens.shape),
            whole(*kv_lens.shape),
            whole(*page_tables.shape),
            None if sinks is None else whole(num_heads),
            None if alibi_slopes is None else whole(num_heads),
            None if visible_until is None else whole(num_tokens),
            per_head(total_rows, head_dim),
            per_head(*k_cache.shape[1:]),
            None if v_cache is None else per_head(*v_cache.shape[1:]),
            None if k_scales is None else per_head(*k_scales.shape[1:]),
            None if v_scales is None else per_head(*v_scales.shape[1:]),
        ],
        out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_r{rows}_k{block_k}_d{padded_dim}_s{splits}"
             + ("" if value_dim is None else f"_latent{head_dim}")
             + ("" if k_scales is None else f"_{k_cache.dtype.name}"),
    )(block_seq, block_row, cu_q_lens, kv_lens, page_tables, sinks, alibi_slopes, visible_until, q_rows, k_cache,
      v_cache, k_scales, v_scales)

    out = outs[0][:, 0] if splits == 1 else merge_splits(*outs)  # [K, T * G + R, Dp]
    out = out[:, : num_tokens * groups, :out_dim].reshape(num_kv_heads, num_tokens, groups, out_dim)
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, out_dim)
    valid = jnp.arange(num_tokens) < cu_q_lens[meta.num_seqs]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def _no_split_outputs(kernel, *refs):
    """The kernel without the split partials' row max and sum outputs."""
    return kernel(*refs, None, None)
