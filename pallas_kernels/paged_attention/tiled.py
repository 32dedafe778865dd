"""Ragged paged attention over per-sequence query tiles, in jnp: the CPU path.

Same contract and glossary as `reference.py` (which stays the definition of
correct). The reference gathers every token's whole page table (`[K, T, M*B, D]`),
so a 512-token prefill chunk copies its sequence's keys 512 times. Here the step's
queries are cut into tiles of `Q` consecutive tokens of ONE sequence (a sequence
with `q_len` new tokens fills `ceil(q_len / Q)` tiles, the last one partly), and
each tile reads its sequence's pages once:

- N tiles in all, a static bound: `min(T, ceil(T / Q) + S)`;
- keys/values `[K, N, M*B, D]` (N instead of T copies), logits `[N, Q, K, G, M*B]`:
  memory O(T x context); decode steps (`Q = 1`, one token per sequence) read each
  sequence's own pages once and run the reference itself.

`Q` is the largest power of two <= T / S (the mean tokens per sequence slot), so
the padding rows of partial tiles never exceed the step's own token count.

Many-sequence steps with long page tables would still gather gigabytes at once (256
sequences x 8192 keys); when a step's tiles would take more than `GATHER_BYTES` of
temporaries, they run in blocks one after another (a loop), each within the budget,
and large decode steps take this path too instead of the reference's whole gather.
The bound N counts a partial tile for every sequence slot, so when the step's tokens
fill fewer tiles (16 whole 64-token prompts: 16 of N = 32) the tiles also run in blocks
of at most `ceil(T / Q)`, and the loop stops after the last block that holds a real
tile: the empty half is never gathered or multiplied.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.kv_quant import Pages, gather_pages, page_values
from pallas_kernels.paged_attention.reference import (PagedMetadata, attention_weights, page_value_rows,
                                                      token_visible_until)

# Temporaries (gathered pages, logits) one block of tiles may take; larger steps run block by block.
GATHER_BYTES = 256 << 20


def tile_size(num_tokens: int, num_seqs: int) -> int:
    """Query rows per tile: the largest power of two <= num_tokens / num_seqs (at least 1)."""
    mean = max(1, num_tokens // max(1, num_seqs))
    return 1 << (mean.bit_length() - 1)


def _sequence_tiles(meta: PagedMetadata, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per sequence `[S]`: its new tokens (0 for padding rows), its first tile and one past its last."""
    num_seqs = meta.kv_lens.shape[0]
    q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
    q_lens = jnp.where(jnp.arange(num_seqs) < meta.num_seqs, q_lens, 0)
    tiles = (q_lens + rows - 1) // rows
    tiles_end = jnp.cumsum(tiles)
    return q_lens, tiles_end - tiles, tiles_end


def tile_layout(meta: PagedMetadata, num_tokens: int, rows: int):
    """Per tile: its sequence `[N]`; per tile row: its token index `[N, Q]`, position and realness."""
    cu_q_lens, kv_lens = meta.cu_q_lens, meta.kv_lens
    num_seqs = kv_lens.shape[0]
    num_tiles = min(num_tokens, -(-num_tokens // rows) + num_seqs)
    q_lens, first_tiles, tiles_end = _sequence_tiles(meta, rows)
    n = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tiles_end, n, side="right"), num_seqs - 1).astype(jnp.int32)
    offset = (n - first_tiles[seq])[:, None] * rows + jnp.arange(rows, dtype=jnp.int32)  # [N, Q] within the sequence
    valid = (offset < q_lens[seq][:, None]) & (n < tiles_end[-1])[:, None]
    token = jnp.where(valid, cu_q_lens[seq][:, None] + offset, num_tokens)  # num_tokens: no token
    positions = jnp.where(valid, (kv_lens[seq] - q_lens[seq])[:, None] + offset, 0)
    return seq, token, positions, valid


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
) -> jax.Array:
    """Attention of the step's queries over the (already written) paged KV; `[T, H, D]` (`[T, H, value_dim]`
    over latent pages; see `reference.py`, bidirectional spans (`meta.visible_until`) included)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = page_values(k_cache).shape
    rows = tile_size(num_tokens, meta.kv_lens.shape[0])
    options = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                   chunk_size=chunk_size, value_dim=value_dim)
    per_tile = tile_bytes(rows, num_heads, num_kv_heads, head_dim, meta.page_tables.shape[1] * page_size, q.dtype)
    if rows == 1 and num_tokens * per_tile <= GATHER_BYTES:
        # One-row tiles are the tokens themselves: the reference's own layout (small decode steps).
        return reference.paged_attention(q, k_cache, v_cache, meta, **options)
    seq, token, positions, valid = tile_layout(meta, num_tokens, rows)
    num_tiles = seq.shape[0]
    # Each token's row in the tiles, and q laid out in them by a scatter: as a gather (tile row -> token), XLA:CPU
    # fuses q's producers (RoPE's cos and sin) and the tile index arithmetic into it and recomputes them for every
    # gathered element, half of a 1024-token prefill on 2 cores.
    slots = token_slots(meta, num_tokens, rows, num_tiles)
    q_tiles = jnp.zeros((num_tiles * rows, num_heads, head_dim), q.dtype).at[slots].set(q, mode="drop",
                                                                                        unique_indices=True)
    q_tiles = q_tiles.reshape(num_tiles, rows, num_heads, head_dim)
    block = tiles_per_block(num_tiles, per_tile, -(-num_tokens // rows))
    attend = partial(_attend_tiles, k_cache, v_cache, meta, **options)
    layout = (q_tiles, seq, token, positions, valid)
    if block == num_tiles:
        out = attend(layout)
    else:  # blocks of tiles one after another, only as many as hold real tiles (the bound counts a partial tile
        # for every sequence slot); the gathered pages never exceed GATHER_BYTES
        blocks = -(-num_tiles // block)
        pad = blocks * block - num_tiles
        fills = (0, 0, num_tokens, 0, False)
        blocked = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1), constant_values=fill)
                   .reshape(blocks, block, *a.shape[1:]) for a, fill in zip(layout, fills)]
        real_tiles = _sequence_tiles(meta, rows)[2][-1]
        one = jax.eval_shape(attend, [a[0] for a in blocked])
        out = jax.lax.fori_loop(0, (real_tiles + block - 1) // block,
                                lambda i, out: out.at[i].set(attend([a[i] for a in blocked])),
                                jnp.zeros((blocks, *one.shape), one.dtype))
    out = out.reshape(-1, num_heads, out.shape[-1])[: num_tiles * rows]
    # Every real token sits in exactly one tile row; padding tokens (slot past the tiles) read zeros.
    return out.at[slots].get(mode="fill", fill_value=0)


def token_slots(meta: PagedMetadata, num_tokens: int, rows: int, num_tiles: int) -> jax.Array:
    """Per token `[T]`: its row in the flat tiles `[N * Q]` (`tile_layout`'s order), N * Q for padding."""
    seq, _, valid = reference.token_layout(meta, num_tokens)
    first_tiles = _sequence_tiles(meta, rows)[1]
    offset = jnp.arange(num_tokens, dtype=jnp.int32) - meta.cu_q_lens[seq]
    return jnp.where(valid, first_tiles[seq] * rows + offset, num_tiles * rows).astype(jnp.int32)


def tile_bytes(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, max_kv: int, dtype: jnp.dtype) -> int:
    """Temporary bytes one tile takes: its gathered keys and values, and float32 logits and probabilities."""
    return 2 * num_kv_heads * max_kv * head_dim * jnp.dtype(dtype).itemsize + 2 * rows * num_heads * max_kv * 4


def tiles_per_block(num_tiles: int, per_tile: int, least_tiles: int | None = None) -> int:
    """Tiles run together: all at once when they fit in GATHER_BYTES and no fewer than `least_tiles` (the tiles
    the step's tokens fill when every sequence's tiles are full) need all of them, else the largest power of two
    that fits the budget and is at most `least_tiles`: a step whose sequences fill their tiles then runs the
    blocks that hold them and skips the bound's empty ones."""
    fit = max(1, GATHER_BYTES // per_tile)
    block = min(fit, least_tiles or num_tiles)
    if block >= num_tiles:
        return num_tiles
    return 1 << (block.bit_length() - 1)


def _attend_tiles(k_cache, v_cache, meta, layout, *, scale, sliding_window, softcap, sinks, alibi_slopes,
                  chunk_size, value_dim) -> jax.Array:
    """Outputs `[n, Q, H, D]` (`D` = `value_dim` over latent pages) of the tiles in `layout` (each tile's
    queries `[n, Q, H, D]`, sequence, token rows, positions, realness)."""
    q_tiles, seq, token, positions, valid = layout
    num_tiles, rows, num_heads, head_dim = q_tiles.shape
    num_kv_heads = page_values(k_cache).shape[0]
    groups = num_heads // num_kv_heads
    pages = meta.page_tables[seq]  # [n, M]
    keys = gather_pages(k_cache, pages, q_tiles.dtype).reshape(num_kv_heads, num_tiles, -1, head_dim)
    values = page_value_rows(keys, v_cache, pages, q_tiles.dtype, value_dim)
    qg = q_tiles.reshape(num_tiles, rows, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("nqkgd,knsd->nqkgs", qg, keys, preferred_element_type=jnp.float32) * scale
    visible_until = token_visible_until(meta, seq[:, None], token)
    probs = attention_weights(logits, positions, valid, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                              alibi_slopes=alibi_slopes, chunk_size=chunk_size,
                              visible_until=visible_until).astype(values.dtype)
    out = jnp.einsum("nqkgs,knsd->nqkgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(num_tiles, rows, num_heads, values.shape[-1]).astype(q_tiles.dtype)
