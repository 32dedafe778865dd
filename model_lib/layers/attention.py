"""Self-attention: projections, optional q/k norm, rotary, and the one dispatch point.

Covers MHA, GQA and MQA (`num_kv_heads` 1..num_heads, per layer where the config
says so), per-layer sliding window or attention chunk (Llama 4),
per-layer rotary (Gemma3's local/global bases) or none (ALiBi, NoPE layers),
ALiBi slopes, attention sinks, attention soft-cap, q/k norms, q/k/v clipping, a
custom query scale (Granite's multiplier, Gemma's `query_pre_attn_scalar`),
Qwen's log-length query scaling past the trained length, and Llama 4's q/k L2 norm
after rotary and attention temperature tuning on its NoPE layers, and Qwen3-Next's output gate
(q_proj yields `[q_h | gate_h]` per head; the output is scaled by sigmoid(gate) before o_proj).

Glossary: B batch, T tokens, P pages, E hidden, H heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from model_lib.config import ModelConfig
from model_lib.layers.linear import Linear
from model_lib.layers.mlp import hidden_projection
from model_lib.layers.norms import make_norm
from model_lib.layers.rotary import apply_rotary, rotary_cos_sin
from model_lib import parallel
from pallas_kernels.paged_attention import PagedMetadata
from pallas_kernels.paged_attention.kv_quant import Pages

KVCache = tuple[Pages, Pages]  # (k, v) pages, each [K, P, page_size, D] or stacked [K, L, P, page_size, D] (or quantized with scales)
# MLA: one latent pool [1, P, page_size, D] (or stacked [1, L, P, page_size, D]) shared by all heads
LatentCache = Pages


@struct.dataclass
class DenseBatch:
    """Attention inputs of a `[B, T]` batch: positions and segment ids (0 = padding).

    Packed training rows carry several segments; a padded batch is one segment per
    row with zeros on the padding. `seq_lens` is each token's sequence length
    (length-dependent rotary variants read it).
    """

    positions: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32
    seq_lens: jax.Array  # [B, T] int32
    rope_positions: jax.Array | None = None  # [3, B, T] int32 M-RoPE positions; None: `positions` drive rotary
    # [B, T] int32: bidirectional spans, the last key position each token sees (its own outside a span, the
    # span's last inside one; `pallas_kernels/paged_attention/reference.py`). None: causal.
    visible_until: jax.Array | None = None


@struct.dataclass
class PagedBatch:
    """Attention inputs of a flat ragged step `[T]` over the paged KV cache.

    Tokens are grouped by sequence (`meta.cu_q_lens`); see
    `pallas_kernels/paged_attention/reference.py` for the layout (bidirectional spans travel as
    `meta.visible_until`). A scanned layer
    stack (`model_lib.layer_scan`) sets `layer` to the index of the running layer in
    its stacked KV pools.
    """

    positions: jax.Array  # [T] int32
    seq_lens: jax.Array  # [T] int32: KV length of each token's sequence after this step
    meta: PagedMetadata  # sequences' token offsets, KV lengths and page tables
    layer: jax.Array | None = None  # [] int32: layer of stacked `[K, L, P, B, D]` pools; None: one-layer pools
    # [S] int32: each sequence's engine slot, its row in per-sequence (recurrent) state pools; padding rows
    # name a scratch row. None outside the engine.
    slots: jax.Array | None = None
    rope_positions: jax.Array | None = None  # [3, T] int32 M-RoPE positions; None: `positions` drive rotary
    # [] int32: MLA layers attend sequences from this index on in the expanded form (`layers/mla.py`),
    # the earlier ones absorbed. None: all absorbed. Other layers ignore it.
    expanded_from: jax.Array | None = None


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    batch: DenseBatch | PagedBatch,
    kv_cache: KVCache | LatentCache | None,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    alibi_slopes: jax.Array | None = None,
    sinks: jax.Array | None = None,
    chunk_size: int | None = None,
    value_dim: int | None = None,
    attend_meta: PagedMetadata | None = None,
) -> tuple[jax.Array, KVCache | LatentCache | None]:
    """The single point where attention leaves the model for `pallas_kernels`.

    `value_dim` (paged batches only): latent pages (MLA's absorbed form). `k` `[T, 1, D]` is the
    latent key, `v` is None, `kv_cache` the one `LatentCache` pool; V is the first `value_dim`
    columns of each key and the output is `[T, H, value_dim]`. `attend_meta` (with `value_dim`): every
    token is written but only these rows attend (the others come back zero).
    """
    options = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
    if chunk_size is not None:
        options["chunk_size"] = chunk_size
    if alibi_slopes is not None:
        options["alibi_slopes"] = alibi_slopes
    if sinks is not None:
        options["sinks"] = sinks
    if isinstance(batch, DenseBatch):
        if batch.visible_until is not None:
            options["visible_until"] = batch.visible_until
        # Under a mesh (`parallel.kernel_plan`) it runs per batch and head shard.
        out = parallel.dense_attention(
            q,
            k,
            v,
            q_positions=batch.positions,
            kv_positions=batch.positions,
            q_segment_ids=batch.segment_ids,
            kv_segment_ids=batch.segment_ids,
            **options,
        )
        return out, kv_cache
    if isinstance(batch, PagedBatch) and value_dim is not None:
        out, latent_cache, _ = parallel.paged_attention(q, k, None, kv_cache, None, batch.meta, layer=batch.layer,
                                                        attend_meta=attend_meta, value_dim=value_dim, **options)
        return out, latent_cache
    if value_dim is not None:
        raise TypeError("latent pages (value_dim) are read by paged batches only")
    if isinstance(batch, PagedBatch):
        # Under a mesh (`parallel.kernel_plan`) the kernel runs per head shard.
        out, k_cache, v_cache = parallel.paged_attention(
            q,
            k,
            v,
            *kv_cache,
            batch.meta,
            layer=batch.layer,
            **options,
        )
        return out, (k_cache, v_cache)
    raise TypeError(f"unsupported attention inputs {type(batch).__name__}")


def logn_query_scale(positions: jax.Array, length: int) -> jax.Array:
    """Per-token query factor: log(p + 1) / log(length) once p + 1 exceeds `length`, else 1.

    Keeps attention entropy level past the trained length (Qwen's `use_logn_attn`).
    """
    count = positions.astype(jnp.float32) + 1.0
    return jnp.where(count > length, jnp.log(count) / jnp.log(float(length)), 1.0)


def temperature_query_scale(positions: jax.Array, floor_scale: int, scale: float) -> jax.Array:
    """Llama 4's per-token query factor on NoPE layers: 1 + scale * log(1 + floor((p + 1) / floor_scale))."""
    steps = jnp.floor((positions.astype(jnp.float32) + 1.0) / floor_scale)
    return jnp.log1p(steps) * scale + 1.0


def l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """Weightless RMS norm over the last axis, in float32 (Llama 4's q/k `L2Norm`)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.num_kv_heads = config.layer_kv_heads(layer)
        self.head_dim = config.head_dim
        self.scale = config.query_scale
        self.softcap = config.attn_logit_softcap
        self.sliding_window = config.layer_window(layer)
        self.chunk_size = config.layer_chunk(layer)
        self.rope = config.layer_rope(layer)
        # Llama 4: L2 norm after rotary on rotary layers, temperature tuning on the others.
        self.l2_qk_eps = config.norm_eps if config.qk_norm == "l2" and self.rope is not None else None
        self.temperature = (
            (config.attn_temperature_floor_scale, config.attn_temperature_scale)
            if config.attn_temperature_floor_scale is not None and self.rope is None
            else None
        )
        self.alibi_slopes = config.alibi_slopes
        self.clip_qkv = config.clip_qkv
        self.logn_length = config.logn_attention_length
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        common = dict(dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs, head_size=self.head_dim)
        self.output_gate = config.attention_output_gate
        q_width = 2 if self.output_gate else 1  # gated: each head's queries then its gate
        self.q_proj = Linear(hidden, q_width * q_dim, axes=("embed", "q_heads"), use_bias=config.qkv_bias,
                             **{**common, "head_size": q_width * self.head_dim})
        self.k_proj = Linear(hidden, kv_dim, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
        self.v_proj = Linear(hidden, kv_dim, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
        self.o_proj = Linear(q_dim, hidden, axes=("q_heads", "embed"), use_bias=config.o_bias, **common)
        norm_shapes = {
            "none": (None, None),
            "l2": (None, None),
            "head": (self.head_dim, self.head_dim),
            "per_head": ((self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)),
        }[config.qk_norm]
        self.q_norm = None if norm_shapes[0] is None else make_norm(config, norm_shapes[0])
        self.k_norm = None if norm_shapes[1] is None else make_norm(config, norm_shapes[1])
        # gpt-oss: a learned per-head logit in every softmax denominator.
        self.sinks = (
            nnx.Param(jnp.zeros((self.num_heads,), jnp.dtype(config.dtype)), logical_axes=("q_heads",))
            if config.attention_sinks
            else nnx.data(None)
        )

    def __call__(
        self, x: jax.Array, batch: DenseBatch | PagedBatch, kv_cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """`x [..., E]` (`[B, T, E]` dense or `[T, E]` paged) -> output and the updated KV pages."""
        lead = x.shape[:-1]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(*lead, self.num_heads, -1)  # [B,T,H,D] ([B,T,H,2D] gated)
        gate = None
        if self.output_gate:
            q, gate = jnp.split(q, 2, axis=-1)
        k = k.reshape(*lead, self.num_kv_heads, self.head_dim)  # [B,T,K,D]
        v = v.reshape(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            positions = batch.positions if batch.rope_positions is None else batch.rope_positions
            cos, sin = rotary_cos_sin(self.rope, positions, batch.seq_lens, q.dtype)
            q = apply_rotary(q, cos, sin, self.rope.interleaved)
            k = apply_rotary(k, cos, sin, self.rope.interleaved)
        if self.l2_qk_eps is not None:
            q, k = l2_norm(q, self.l2_qk_eps), l2_norm(k, self.l2_qk_eps)
        if self.temperature is not None:
            factor = temperature_query_scale(batch.positions, *self.temperature)
            q = (q.astype(jnp.float32) * factor[..., None, None]).astype(q.dtype)
        if self.logn_length is not None:
            q = q * logn_query_scale(batch.positions, self.logn_length).astype(q.dtype)[..., None, None]
        slopes = None if self.alibi_slopes is None else jnp.asarray(self.alibi_slopes, jnp.float32)
        out, kv_cache = attend(
            q,
            k,
            v,
            batch,
            kv_cache,
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            alibi_slopes=slopes,
            sinks=None if self.sinks is None else self.sinks[...],
            chunk_size=self.chunk_size,
        )
        out = out.reshape(*lead, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate.reshape(out.shape))
        return self.o_proj(out), kv_cache


class LinearAttention(nnx.Module):
    """Attention replaced by one bias-free hidden->hidden projection `linear_attn`.

    DeciLM / Nemotron-NAS `replace_with_linear`: each token is mapped on its own (no
    rotary, no mixing across tokens), so the layer keeps no KV cache. Same call
    signature as `Attention`; the output dimension shards like an MLP's inner one.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.linear_attn = hidden_projection(config, rngs)

    def __call__(
        self, x: jax.Array, batch: DenseBatch | PagedBatch, kv_cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        return self.linear_attn(x), kv_cache
