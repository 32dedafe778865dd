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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.kv_quant import Pages, gather_pages, page_values
from pallas_kernels.paged_attention.reference import PagedMetadata, attention_weights, page_value_rows


def tile_size(num_tokens: int, num_seqs: int) -> int:
    """Query rows per tile: the largest power of two <= num_tokens / num_seqs (at least 1)."""
    mean = max(1, num_tokens // max(1, num_seqs))
    return 1 << (mean.bit_length() - 1)


def tile_layout(meta: PagedMetadata, num_tokens: int, rows: int):
    """Per tile: its sequence `[N]`; per tile row: its token index `[N, Q]`, position and realness."""
    cu_q_lens, kv_lens = meta.cu_q_lens, meta.kv_lens
    num_seqs = kv_lens.shape[0]
    num_tiles = min(num_tokens, -(-num_tokens // rows) + num_seqs)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    q_lens = jnp.where(jnp.arange(num_seqs) < meta.num_seqs, q_lens, 0)
    tiles_end = jnp.cumsum((q_lens + rows - 1) // rows)  # [S] one past each sequence's last tile
    n = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tiles_end, n, side="right"), num_seqs - 1).astype(jnp.int32)
    first_tile = tiles_end[seq] - (q_lens[seq] + rows - 1) // rows
    offset = (n - first_tile)[:, None] * rows + jnp.arange(rows, dtype=jnp.int32)  # [N, Q] within the sequence
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
    over latent pages; see `reference.py`)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = page_values(k_cache).shape
    groups = num_heads // num_kv_heads
    rows = tile_size(num_tokens, meta.kv_lens.shape[0])
    if rows == 1:  # one-row tiles are the tokens themselves: the reference's own layout (decode steps)
        return reference.paged_attention(q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window,
                                         softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, chunk_size=chunk_size,
                                         value_dim=value_dim)
    seq, token, positions, valid = tile_layout(meta, num_tokens, rows)
    num_tiles = seq.shape[0]
    pages = meta.page_tables[seq]  # [N, M]
    max_kv = pages.shape[1] * page_size
    keys = gather_pages(k_cache, pages, q.dtype).reshape(num_kv_heads, num_tiles, max_kv, head_dim)
    values = page_value_rows(keys, v_cache, pages, q.dtype, value_dim)

    qg = q.at[token].get(mode="fill", fill_value=0).reshape(num_tiles, rows, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("nqkgd,knsd->nqkgs", qg, keys, preferred_element_type=jnp.float32) * scale
    probs = attention_weights(logits, positions, valid, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                              alibi_slopes=alibi_slopes, chunk_size=chunk_size).astype(values.dtype)
    out = jnp.einsum("nqkgs,knsd->nqkgd", probs, values, preferred_element_type=jnp.float32)
    out = out.reshape(num_tiles * rows, num_heads, values.shape[-1]).astype(q.dtype)
    # Every real token sits in exactly one tile row; padding rows point past the end and drop.
    return jnp.zeros((num_tokens, *out.shape[1:]), q.dtype).at[token.reshape(-1)].set(out, mode="drop")
