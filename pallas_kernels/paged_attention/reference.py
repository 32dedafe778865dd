"""Ragged paged attention in plain jnp: the definition of correct and the CPU path.

One call serves a flat batch that mixes prefill chunks and decode tokens of many
sequences (vLLM v1 / tpu-inference style).

Glossary: T tokens in the step, S sequences (padded), H query heads, K kv heads,
G = H // K, D head_dim, P pages in the pool, B page size (tokens per page),
M max pages per sequence in this step.

Inputs:
- q `[T, H, D]`, k/v `[T, K, D]`: the step's tokens, sequence after sequence.
The batch layout travels as one `PagedMetadata`:
- cu_q_lens `[S+1]`: token offsets of each sequence; padded sequences repeat the
  last offset (zero new tokens).
- kv_lens `[S]`: each sequence's KV length after this step (cached + new).
- page_tables `[S, M]`: page ids of each sequence in order.
- k_cache/v_cache `[K, P, B, D]`: the paged pool of one layer, or a stacked pool
  `[K, L, P, B, D]` of L layers (a scanned layer stack carries it through its loop)
  with `layer` naming the one to read and write. The layer is folded into the page
  axis (`layer_pages`: a free reshape to `[K, L*P, B, D]` and page ids offset by
  `layer * P`), so no path copies a layer's pool out of the stack.
  Quantized pages travel with their scales (`kv_quant.QuantizedPages`): written quantized,
  read dequantized to q's dtype.
- num_seqs: how many of the S rows are real.
- visible_until `[T]` (optional): per token, the last key position it may see (bidirectional
  spans, below); None: plain causal, and nothing is computed for it.
- Latent pages (MLA's absorbed form, `value_dim`): there is no V pool (`v`, `v_cache`
  None); V is the first `value_dim` columns of each key (`[1, P, B, D]`: one kv head of
  width D = kv_lora_rank + qk_rope_head_dim whose first kv_lora_rank columns are the
  latent), and the output is `[T, H, value_dim]`.

The new tokens of sequence s sit at positions `kv_lens[s] - q_len(s) ...
kv_lens[s] - 1`; they are written into their pages, then every token attends
causally to its own sequence (optionally within a sliding window, or within its
chunk of `chunk_size` positions (Llama 4's chunked local attention: key and
query share floor(pos / chunk_size)), with a soft-cap, with per-head attention
sinks and with ALiBi).

Bidirectional spans (Gemma 3's image runs, SDAR's blocks): runs of tokens of one sequence that
attend to each other in both directions. `visible_until[t]` is the last key position token t sees:
its own position for a causal token, the span's last position inside a span (never less than its
own position; keys past the sequence's KV length are never seen). The causal test
`k_pos <= q_pos` becomes `k_pos <= visible_until`; the sliding window, the attention chunk and
ALiBi still measure from the query's own position. A span must be whole in the step (the
scheduler never splits one across prefill chunks), since its later keys are written by it.

ALiBi (`alibi_slopes [H]`, one slope per query head): `logits = softcap(scale *
q.k) + slope[h] * (k_pos - q_pos)`, with q_pos the token's position in its
sequence and k_pos the key's index in it; the same relative form as the dense
reference (<= 0 for visible keys, equal up to a per-row constant to the absolute
`slope * k_pos` of HF BLOOM/MPT/Baichuan). Sinks get no bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.position_bias import RelativePositionBias
from pallas_kernels.paged_attention.kv_quant import Pages, gather_pages, page_values, store_tokens

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class PagedMetadata:
    """Where each sequence's tokens and pages are in a ragged step (see the module docstring)."""

    cu_q_lens: jax.Array  # [S+1] int32
    kv_lens: jax.Array  # [S] int32
    page_tables: jax.Array  # [S, M] int32
    num_seqs: jax.Array  # [] int32
    visible_until: jax.Array | None = None  # [T] int32: last key position each token sees; None: causal


def token_layout(meta: PagedMetadata, num_tokens: int):
    """Per token: its sequence, its position, and whether it is real (not padding)."""
    cu_q_lens, kv_lens = meta.cu_q_lens, meta.kv_lens
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, cu_q_lens.shape[0] - 2)
    valid = t < cu_q_lens[meta.num_seqs]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    positions = kv_lens[seq] - q_lens[seq] + (t - cu_q_lens[seq])
    return seq, jnp.where(valid, positions, 0), valid


def token_visible_until(meta: PagedMetadata, seq: jax.Array, token: jax.Array | None = None) -> jax.Array | None:
    """Per query row: `meta.visible_until` of its token (`token`, default every token in order; an index
    past the end is padding), cut to its sequence `seq`'s KV length (same shape); None without spans."""
    if meta.visible_until is None:
        return None
    until = meta.visible_until if token is None else meta.visible_until.at[token].get(mode="fill", fill_value=0)
    return jnp.minimum(until, meta.kv_lens[seq] - 1)


def layer_pages(
    caches: tuple[jax.Array, ...],
    meta: PagedMetadata,
    layer: jax.Array | int | None = None,
    head: jax.Array | int | None = None,
) -> tuple[tuple[jax.Array, ...], PagedMetadata]:
    """One layer's pages of pools as one-layer pools plus page tables that address them, without a copy.

    Each cache is `[K, P, ...]` (`layer` None) or stacked `[K, L, P, ...]` (same K, L, P for all); each
    comes back as `[K, L*P, ...]` (a reshape XLA makes a bitcast), with page ids offset by `layer * P`.
    With `head` (a replicated pool read by one kv head's query heads) the kv heads fold into the pages
    too: `[1, K*L*P, ...]`. Any trailing layout works (pages of values, or of per-token scales).
    """
    if layer is None and head is None:
        return tuple(caches), meta
    values = page_values(caches[0])
    lead = values.shape[:3] if layer is not None else (values.shape[0], 1, values.shape[1])
    num_kv_heads, num_layers, num_pages = lead
    offset = 0 if layer is None else layer * num_pages
    if head is None:
        folded = (num_kv_heads, num_layers * num_pages)
    else:
        folded = (1, num_kv_heads * num_layers * num_pages)
        offset = offset + head * num_layers * num_pages
    rest = 3 if layer is not None else 2
    pools = tuple(jax.tree.map(lambda c: c.reshape(*folded, *c.shape[rest:]), cache) for cache in caches)
    return pools, meta.replace(page_tables=meta.page_tables + jnp.asarray(offset, meta.page_tables.dtype))


def write_kv(
    k: jax.Array,
    v: jax.Array | None,
    k_cache: Pages,
    v_cache: Pages | None,
    meta: PagedMetadata,
    layer: jax.Array | int | None = None,
) -> tuple[Pages, Pages | None]:
    """Scatter the step's keys/values into their pages (padding tokens are dropped; quantized on the way
    into quantized pages); `layer` of a stacked pool (see the module docstring) or None for a one-layer
    pool. Latent pages have no V pool (`v`, `v_cache` None: returned None). Returns the caches in their
    own shape."""
    caches = (k_cache, v_cache)
    (k_pages, v_pages), meta = layer_pages(caches, meta, layer)
    num_pages, page_size = page_values(k_pages).shape[1:3]
    seq, positions, valid = token_layout(meta, k.shape[0])
    page = meta.page_tables[seq, positions // page_size]
    page = jnp.where(valid, page, num_pages)  # out of range -> dropped
    slot = positions % page_size
    index = (slice(None), page, slot)
    written = tuple(None if pages is None else store_tokens(pages, index, x.swapaxes(0, 1))
                    for pages, x in ((k_pages, k), (v_pages, v)))
    return jax.tree.map(lambda new, old: new.reshape(old.shape), written, caches)


def check_value_layout(v_cache: Pages | None, value_dim: int | None, head_dim: int) -> None:
    """ValueError unless there is exactly one of a V pool and a `value_dim` (latent pages), in range."""
    if (v_cache is None) == (value_dim is None):
        raise ValueError("paged attention takes either a V pool or value_dim (latent pages), not both or neither")
    if value_dim is not None and not 0 < value_dim <= head_dim:
        raise ValueError(f"value_dim={value_dim} is outside 1..{head_dim} (the latent pages' width)")


def page_value_rows(keys: jax.Array, v_cache: Pages | None, pages: jax.Array, dtype, value_dim: int | None):
    """The values beside gathered `keys [K, N, S, D]`: the V pool's rows of the same `pages`, or the keys'
    first `value_dim` columns over latent pages."""
    check_value_layout(v_cache, value_dim, keys.shape[-1])
    if v_cache is None:
        return keys[..., :value_dim]
    return gather_pages(v_cache, pages, dtype).reshape(keys.shape)


def attention_weights(
    logits: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    *,
    sliding_window: int | None,
    softcap: float | None,
    sinks: jax.Array | None,
    alibi_slopes: jax.Array | None,
    chunk_size: int | None = None,
    position_bias: RelativePositionBias | None = None,
    visible_until: jax.Array | None = None,
) -> jax.Array:
    """Scaled logits `[..., K, G, L]` over keys 0..L-1 of each row's sequence -> float32 softmax weights.

    `positions` and `valid` (shape `[...]`) give each query row's position and whether it is real;
    `visible_until` (same shape, optional) its last visible key (bidirectional spans; default its
    position); soft-cap, ALiBi, the causal/window/chunk mask and the sinks apply as the module docstring says.
    """
    num_kv_heads, groups, num_keys = logits.shape[-3:]
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    kv_index = jnp.arange(num_keys, dtype=jnp.int32)
    q_pos = positions[..., None, None, None]
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, groups, 1)
        logits = logits + slopes * (kv_index - q_pos).astype(jnp.float32)
    if position_bias is not None:  # [..., L, H] -> [..., K, G, L]
        bias = jnp.moveaxis(position_bias(positions[..., None], kv_index), -1, -2)
        logits = logits + bias.reshape(*bias.shape[:-2], num_kv_heads, groups, num_keys)
    last_key = q_pos if visible_until is None else visible_until[..., None, None, None]
    visible = (kv_index <= last_key) & valid[..., None, None, None]
    if sliding_window is not None:
        visible &= q_pos - kv_index < sliding_window
    if chunk_size is not None:
        visible &= kv_index // chunk_size == q_pos // chunk_size
    logits = jnp.where(visible, logits, MASK_VALUE)

    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(num_kv_heads, groups, 1)
        row_max = jnp.maximum(row_max, sink)
    weights = jnp.exp(logits - row_max)
    denominator = jnp.sum(weights, axis=-1, keepdims=True)
    if sinks is not None:
        denominator = denominator + jnp.exp(sink - row_max)
    return weights / denominator


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
    layer: jax.Array | int | None = None,
    position_bias: RelativePositionBias | None = None,
) -> jax.Array:
    """Attention of the step's queries over the (already written) paged KV of `layer`; `[T, H, D]`
    (`[T, H, value_dim]` over latent pages, `v_cache` None). `position_bias`: T5's relative buckets
    (`pallas_kernels/position_bias.py`), the reference alone takes it. `meta.visible_until`: bidirectional
    spans (module docstring)."""
    (k_cache, v_cache), meta = layer_pages((k_cache, v_cache), meta, layer)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = page_values(k_cache).shape
    groups = num_heads // num_kv_heads
    seq, positions, valid = token_layout(meta, num_tokens)
    pages = meta.page_tables[seq]  # [T, M]
    max_kv = pages.shape[1] * page_size
    keys = gather_pages(k_cache, pages, q.dtype).reshape(num_kv_heads, num_tokens, max_kv, head_dim)
    values = page_value_rows(keys, v_cache, pages, q.dtype, value_dim)

    # Both products batch over (kv head, token), the gathered pages' own order, and take the keys as the left
    # operand: XLA:CPU then reads the gathered pages as they are, where token-major products copied and
    # transposed every token's keys and values (a quarter of a 16-sequence decode step's attention on 2 cores);
    # only the small q, logits and outputs move.
    qg = q.reshape(num_tokens, num_kv_heads, groups, head_dim).transpose(1, 0, 3, 2)  # [K, T, D, G]
    logits = jnp.einsum("ktsd,ktdg->ktsg", keys, qg, preferred_element_type=jnp.float32).transpose(1, 0, 3, 2) * scale
    probs = attention_weights(logits, positions, valid, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                              alibi_slopes=alibi_slopes, chunk_size=chunk_size, position_bias=position_bias,
                              visible_until=token_visible_until(meta, seq)).astype(values.dtype)
    out = jnp.einsum("ktgs,ktsd->ktgd", probs.transpose(1, 0, 2, 3), values, preferred_element_type=jnp.float32)
    out = jnp.where(valid[None, :, None, None], out, 0.0).transpose(1, 0, 2, 3)
    return out.reshape(num_tokens, num_heads, values.shape[-1]).astype(q.dtype)


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    k_cache: Pages,
    v_cache: Pages | None,
    meta: PagedMetadata,
    layer: jax.Array | int | None = None,
    **options,
) -> tuple[jax.Array, Pages, Pages]:
    """Write the step's k/v into the pages of `layer`, then attend (options as `paged_attention`).

    Returns (out, k_cache, v_cache).
    """
    k_cache, v_cache = write_kv(k, v, k_cache, v_cache, meta, layer)
    return paged_attention(q, k_cache, v_cache, meta, layer=layer, **options), k_cache, v_cache
