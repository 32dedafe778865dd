"""MLA's expanded form over latent pages: per-head attention for prefill chunks, in jnp.

Latent pages (`reference.py`, `value_dim`) hold per token a latent `c [L]` and one rotated
rope key `k_rope [R]` shared by every head. The absorbed form attends to them directly
(queries projected into the latent space, `L + R` wide, and outputs projected back per
token). The expanded form instead up-projects the keys: per head `k_nope = c @ W_UK [L, H, N]`
and `v = c @ W_UV [L, H, V]`, then standard attention of `[q_nope | q_rope]` against
`[k_nope | k_rope]` with `V`-wide values. Its cost per (query, key) pair is
`2H(N + R + V)` FLOPs against the absorbed `2H(2L + R)`, for an up-projection of
`2LH(N + V)` per key: it pays when enough queries share each key, i.e. for long prefill
chunks (`expanded_crossover`).

Which rows: the step's sequences `first .. num_seqs - 1` (a suffix, so the absorbed rows
keep a contiguous token range: `absorbed_rows`). Their keys are every cached token of
those sequences (positions `0 .. kv_len - 1`, the step's own tokens already written),
laid end to end in one key axis of `sum(kv_len)` entries and read in blocks of `C`:
each block gathers its `C` latent rows, up-projects them once, and updates an online
softmax of ALL `T` query rows (masked to the block's keys of each row's own sequence,
causal, optional sliding window and soft-cap). The loop runs `ceil(sum(kv_len) / C)`
times (a traced bound), so temporaries are `O(T x H x C)` whatever the context length,
never a `[tokens, max_len]` gather; the price is that each block computes all `T` rows
(one long chunk per step is the common case, where that is the chunk itself).

Glossary: T tokens, S sequences, H heads, N nope dim, R rope dim, V v dim, L latent
(kv_lora_rank), C keys per block, B page size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention.kv_quant import Pages, dequantize_pages, page_values
from pallas_kernels.paged_attention.reference import MASK_VALUE, PagedMetadata, layer_pages, token_layout

# Float32 temporaries (logits, probabilities) one key block may take.
BLOCK_BYTES = 64 << 20
MIN_KEY_BLOCK, MAX_KEY_BLOCK = 16, 1024


def expanded_crossover(kv_lora_rank: int, nope_dim: int, v_dim: int) -> int:
    """New tokens per chunk above which the expanded form takes fewer FLOPs than the absorbed one.

    Up-projecting one key costs `2LH(N + V)`; each query that reads it saves `2H(2L + R) - 2H(N + R + V)`,
    so the chunk needs `L(N + V) / (2L - N - V)` queries (about 171 at DeepSeek-V3's L=512, N=V=128).
    """
    saving = 2 * kv_lora_rank - nope_dim - v_dim
    return 1 if saving <= 0 else max(1, -(-kv_lora_rank * (nope_dim + v_dim) // saving))


def absorbed_rows(meta: PagedMetadata, first: jax.Array) -> PagedMetadata:
    """The metadata of sequences `0 .. first - 1` only: later sequences keep their KV lengths and pages but
    have no query rows (their tokens read as padding), so an attention call over it skips them."""
    cu_q_lens = jnp.minimum(meta.cu_q_lens, meta.cu_q_lens[first])
    return meta.replace(cu_q_lens=cu_q_lens, num_seqs=jnp.minimum(meta.num_seqs, first))


def key_block(num_tokens: int, num_heads: int) -> int:
    """Keys per block: the largest power of two whose float32 logits and probabilities fit BLOCK_BYTES, and
    no more than the step's tokens (rounded up to a power of two): the last block's padding keys are
    up-projected too, so a block much wider than the chunk wastes work when the context is short."""
    fit = max(1, BLOCK_BYTES // (2 * 4 * num_tokens * num_heads))
    chunk = 1 << max(0, num_tokens - 1).bit_length()
    return max(MIN_KEY_BLOCK, min(MAX_KEY_BLOCK, chunk, 1 << (fit.bit_length() - 1)))


def expanded_attention(
    q_nope: jax.Array,
    q_rope: jax.Array,
    pages: Pages,
    meta: PagedMetadata,
    first: jax.Array,
    w_uk: jax.Array,
    w_uv: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    layer: jax.Array | int | None = None,
    block: int | None = None,
) -> jax.Array:
    """Outputs `[T, H, V]` of the tokens of sequences `first ..` (zeros elsewhere), attending per head to
    their sequences' latent pages (already holding the step's tokens) up-projected by `w_uk [L, H, N]`
    and `w_uv [L, H, V]`; `layer` of a stacked pool as in `reference.py`."""
    if meta.visible_until is not None:
        raise ValueError("bidirectional spans (visible_until) are not supported by MLA's expanded attention")
    (pages,), meta = layer_pages((pages,), meta, layer)
    num_tokens, num_heads, _ = q_nope.shape
    latent_dim, page_size = w_uk.shape[0], page_values(pages).shape[2]
    dtype = q_nope.dtype
    block = block or key_block(num_tokens, num_heads)

    num_seqs = meta.kv_lens.shape[0]
    seq_index = jnp.arange(num_seqs, dtype=jnp.int32)
    kv_lens = jnp.where((seq_index >= first) & (seq_index < meta.num_seqs), meta.kv_lens, 0)  # [S]
    keys_end = jnp.cumsum(kv_lens)  # [S] one past each sequence's last key on the key axis
    num_keys = keys_end[-1]
    q_seq, q_pos, q_valid = token_layout(meta, num_tokens)
    q_valid &= q_seq >= first
    query = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(1, 0, 2)  # [H,T,N+R]: heads lead every dot
    rope_dim = q_rope.shape[-1]

    def attend_block(b, carry):
        row_max, row_sum, acc = carry  # [H,T], [H,T], [H,T,V] float32
        key = b * block + jnp.arange(block, dtype=jnp.int32)  # [C] on the key axis
        k_seq = jnp.minimum(jnp.searchsorted(keys_end, key, side="right"), num_seqs - 1).astype(jnp.int32)
        k_pos = key - (keys_end[k_seq] - kv_lens[k_seq])
        page = meta.page_tables[k_seq, k_pos // page_size]
        rows = dequantize_pages(jax.tree.map(lambda a: a[0, page, k_pos % page_size], pages), dtype)  # [C, L+R]
        latent, k_rope = rows[:, :latent_dim].astype(dtype), rows[:, latent_dim:].astype(dtype)
        k_nope = jnp.einsum("cl,lhn->hcn", latent, w_uk, preferred_element_type=jnp.float32).astype(dtype)
        keys = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (num_heads, block, rope_dim))], axis=-1)  # [H,C,N+R]
        values = jnp.einsum("cl,lhv->hcv", latent, w_uv, preferred_element_type=jnp.float32).astype(dtype)
        logits = jnp.einsum("htd,hcd->htc", query, keys, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        visible = (k_seq[None] == q_seq[:, None]) & (k_pos[None] <= q_pos[:, None])  # [T, C]
        visible &= (key < num_keys)[None] & q_valid[:, None]
        if sliding_window is not None:
            visible &= q_pos[:, None] - k_pos[None] < sliding_window
        logits = jnp.where(visible[None], logits, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        probs = jnp.exp(logits - new_max[..., None])
        correction = jnp.exp(row_max - new_max)
        row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("htc,hcv->htv", probs.astype(dtype), values,
                                                       preferred_element_type=jnp.float32)
        return new_max, row_sum, acc

    v_dim = w_uv.shape[-1]
    init = (jnp.full((num_heads, num_tokens), MASK_VALUE, jnp.float32), jnp.zeros((num_heads, num_tokens), jnp.float32),
            jnp.zeros((num_heads, num_tokens, v_dim), jnp.float32))
    num_blocks = (num_keys + block - 1) // block
    _, row_sum, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
    out = (acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]).transpose(1, 0, 2)  # [T,H,V]
    return jnp.where(q_valid[:, None, None], out, 0.0).astype(dtype)
