"""Cross attention over per-slot encoder K/V in plain jnp: the definition of correct and the CPU path.

An encoder-decoder's decoder tokens attend, bidirectionally, to every real position of their own
sequence's encoder output. The engine keeps those keys and values in a pool with one row per slot
(`model_lib.cache_spec.CrossKV`), written once when the encoder runs for the sequence.

Glossary: T tokens in the step, N slots, S max encoder positions, H query heads, K kv heads,
G = H // K, D head_dim.

- pools `k_pool`, `v_pool` `[N, S, K, D]` and `lengths [N]` int32 (each slot's encoder length);
- `q [T, H, D]` and `token_slots [T]`: each query's slot (padding tokens may name any slot: their rows
  are garbage the caller drops).

No Pallas kernel yet: a decode token reads `S` keys once, so XLA's gather + einsum is bandwidth-bound
like a kernel would be; prefill chunks of decoder prompts are a few tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def write_cross(
    k_pool: jax.Array, v_pool: jax.Array, lengths: jax.Array, slot: jax.Array, k: jax.Array, v: jax.Array,
    length: jax.Array, offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Store one sequence's encoder keys/values `k, v [S', K, D]` in `slot`'s rows from `offset` on (a part of
    its encoder output: Mllama writes one image at a time) and set its length to `length` (rows past it are
    padding); returns the pools and lengths."""
    start = (slot, offset, 0, 0)
    k_pool = jax.lax.dynamic_update_slice(k_pool, k[None].astype(k_pool.dtype), start)
    v_pool = jax.lax.dynamic_update_slice(v_pool, v[None].astype(v_pool.dtype), start)
    return k_pool, v_pool, lengths.at[slot].set(length)


def cross_attention(
    q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, lengths: jax.Array, token_slots: jax.Array, *, scale: float,
    kv_mask: jax.Array | None = None,
) -> jax.Array:
    """`[T, H, D]` in q's dtype: each query over its slot's first `lengths[slot]` encoder positions (and of
    those, where given, only the ones its row of `kv_mask [T, S]` keeps)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    keys = jnp.take(k_pool, token_slots, axis=0, mode="clip").astype(q.dtype)  # [T, S, K, D]
    values = jnp.take(v_pool, token_slots, axis=0, mode="clip").astype(q.dtype)
    qg = q.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("tkgd,tskd->tkgs", qg, keys, preferred_element_type=jnp.float32) * scale
    length = jnp.take(lengths, token_slots, mode="clip")
    visible = jnp.arange(keys.shape[1])[None, :] < length[:, None]  # [T, S]
    if kv_mask is not None:
        visible = visible & kv_mask
    logits = jnp.where(visible[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
