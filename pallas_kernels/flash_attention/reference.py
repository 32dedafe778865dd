"""Plain-jnp causal attention with segments, sliding window, attention chunks, soft-cap and ALiBi.

Glossary: B batch, T query tokens, S key tokens, H query heads, K kv heads,
G = H // K query heads per kv head, D head_dim.

Masking is by position and segment, never by index: a key is visible to a query
when both carry the same non-zero segment id, the key's position is not after the
query's (unless `causal=False`: encoders' bidirectional attention), with a window W
`q_pos - k_pos < W`, and with a chunk size C (Llama 4's chunked
local attention) `k_pos // C == q_pos // C`. Segment 0 marks padding. Bidirectional spans
(`visible_until [B, T]`, Gemma 3's image runs, SDAR's blocks): a query sees keys up to position
`visible_until` instead of its own (the span's last position inside a span, its own outside); the
window and chunk still measure from its own position (see `paged_attention/reference.py`). Rows
with no visible key (padding queries) get a uniform softmax over a finite fill
value instead of NaN.

ALiBi (`alibi_slopes [H]`, one slope per query head, so heads of one kv group may
differ): `logits = softcap(scale * q.k) + slope[h] * (k_pos - q_pos)`. This relative
form is <= 0 for every visible key and differs from the absolute `slope * k_pos`
of HF BLOOM/MPT/Baichuan only by a per-row constant, which softmax removes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.position_bias import RelativePositionBias

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    sliding_window: int | None,
    chunk_size: int | None = None,
    causal: bool = True,
    visible_until: jax.Array | None = None,
) -> jax.Array:
    """Boolean `[B, T, S]`: which keys each query may attend to (`visible_until [B, T]`: bidirectional spans)."""
    q_pos, k_pos = q_positions[:, :, None], kv_positions[:, None, :]
    q_seg, k_seg = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
    visible = (q_seg == k_seg) & (k_seg != 0)
    if causal:
        visible &= k_pos <= (q_pos if visible_until is None else visible_until[:, :, None])
    if sliding_window is not None:
        visible &= q_pos - k_pos < sliding_window
    if chunk_size is not None:
        visible &= k_pos // chunk_size == q_pos // chunk_size
    return visible


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    sinks: jax.Array | None = None,
    chunk_size: int | None = None,
    causal: bool = True,
    position_bias: RelativePositionBias | None = None,
    visible_until: jax.Array | None = None,
) -> jax.Array:
    """Attention of `q [B,T,H,D]` over `k, v [B,S,K,D]`; returns `[B,T,H,D]` in q's dtype.

    `visible_until [B, T]` (causal only): the last key position each query sees (bidirectional spans).

    `sinks [H]` (gpt-oss): one learned logit per query head that joins every row's
    softmax denominator and attends to nothing. `position_bias` (T5's relative buckets,
    `pallas_kernels/position_bias.py`) adds one logit per head and query/key position pair.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    if alibi_slopes is not None:
        distance = (kv_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.float32)  # [B, T, S]
        slopes = alibi_slopes.astype(jnp.float32).reshape(1, num_kv_heads, groups, 1, 1)
        logits = logits + slopes * distance[:, None, None]
    if position_bias is not None:
        bias = position_bias(q_positions[:, :, None], kv_positions[:, None, :])  # [B, T, S, H]
        logits = logits + bias.transpose(0, 3, 1, 2).reshape(batch, num_kv_heads, groups, q_len, -1)
    if visible_until is not None and not causal:
        raise ValueError("visible_until (bidirectional spans) applies to causal attention only")
    visible = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, chunk_size, causal,
                             visible_until)
    logits = jnp.where(visible[:, None, None, :, :], logits, MASK_VALUE)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    else:
        sink = sinks.astype(jnp.float32).reshape(1, num_kv_heads, groups, 1, 1)
        row_max = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
        weights = jnp.exp(logits - row_max)
        probs = (weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - row_max))).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
