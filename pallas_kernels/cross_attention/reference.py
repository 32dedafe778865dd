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
    take = lambda x: jnp.take(x, token_slots, axis=0, mode="clip")  # noqa: E731  (each query's own slot)
    out = dense_cross_attention(q[:, None], take(k_pool), take(v_pool), take(lengths), scale=scale,
                                kv_mask=None if kv_mask is None else kv_mask[:, None])
    return out[:, 0]


def dense_cross_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, scale: float, kv_mask: jax.Array | None = None,
) -> jax.Array:
    """`[N, L, H, D]` in q's dtype: sequence n's `L` queries `q [N, L, H, D]` over its first `lengths[n]` keys and
    values `k, v [N, S, K, D]` (and of those, where given, the ones `kv_mask [N, L, S]` keeps). A dense batch's
    queries read their sequence's keys in place, never a copy per query."""
    n, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    qg = q.reshape(n, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("nlkgd,nskd->nkgls", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    visible = jnp.broadcast_to((jnp.arange(k.shape[1]) < lengths[:, None])[:, None, :], (n, length, k.shape[1]))
    if kv_mask is not None:
        visible = visible & kv_mask
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("nkgls,nskd->nlkgd", probs, v.astype(q.dtype), preferred_element_type=jnp.float32)
    return out.reshape(n, length, num_heads, head_dim).astype(q.dtype)
