"""The decoder-only transformer that every dense family in the registry composes.

Module and attribute names follow Hugging Face (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `lm_head`), so most checkpoints load by
identity and PEFT adapter keys line up. Families differ only through
`ModelConfig` fields; there is no per-family forward code.

Glossary: B batch, T tokens, E hidden, V vocab.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.cache_spec import PoolSizes
from model_lib.config import ModelConfig
from model_lib.layers import MLP, Attention, DenseBatch, Embed, KVCache, Linear, PagedBatch, make_norm
from model_lib.layers.mla import MLAttention
from model_lib.layer_scan import segment_layers
from model_lib.layers.attention import LinearAttention
from model_lib.layers.mlp import LinearMLP
from model_lib.layers.moe import MoE
from model_lib.vision.merge import MergedEmbeddings
from model_lib.layers.mixers import make_mixer

Batch = DenseBatch | PagedBatch


def block_visible_until(positions: jax.Array, block_size: int | None) -> jax.Array | None:
    """Block-causal attention (SDAR): each token sees up to the last position of its block of `block_size`."""
    if block_size is None:
        return None
    return (positions // block_size + 1) * block_size - 1


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its segment: `[B, T]` ids -> `[B, T]` positions.

    Handles left padding (positions start at the first real token), right padding
    and packed rows (positions restart at every segment boundary); padding (0) gets 0.
    """
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    # Padding sits at position 0 so it never stretches a length-dependent rotary.
    return jnp.where(segment_ids != 0, index - segment_start, 0)


class DecoderLayer(nnx.Module):
    """One block. Norm placement (`block_norms`) and parallel attention+MLP follow the config.

    HF's `post_attention_layernorm` is the norm in front of the MLP in `pre` blocks
    and the second norm of a `two_norms` parallel block. In `pre` blocks either
    sublayer may be a single linear projection or absent (`layer_attention`,
    `layer_mlp`); an absent sublayer takes its norm with it and passes x through.
    Arctic's MoE layers (`moe_residual_mlp_size`) run the MoE on the block input beside a
    dense `residual_mlp` on the post-attention stream (see `ModelConfig`). State-space layers
    (Mamba, Mamba-2) hold a `mixer` where others hold `self_attn`, in `pre` blocks.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.block_norms = config.block_norms
        self.parallel_block = config.parallel_block
        self.residual_multiplier = config.residual_multiplier
        attention, mlp = config.layer_attention_kind(layer), config.layer_mlp_kind(layer)
        attention_class = MLAttention if config.attention_kind == "mla" else Attention
        self.self_attn = (
            attention_class(config, layer, rngs=rngs)
            if attention == "attention"
            else LinearAttention(config, rngs=rngs) if attention == "linear" else None
        )
        self.mixer = make_mixer(config, layer, rngs=rngs) if config.is_ssm_layer(layer) else None
        if mlp == "mlp":
            self.mlp = MoE(config, rngs=rngs) if config.is_moe_layer(layer) else MLP(config, layer, rngs=rngs)
        else:
            self.mlp = LinearMLP(config, rngs=rngs) if mlp == "linear" else None
        self.input_layernorm = (
            None if config.block_norms in ("post", "post_residual") or attention == "none" else make_norm(config)
        )
        if config.parallel_block != "shared_norm" and mlp != "none":
            self.post_attention_layernorm = make_norm(config)
        if config.block_norms == "sandwich":
            self.pre_feedforward_layernorm = make_norm(config)
        if config.block_norms in ("sandwich", "post", "post_residual"):
            self.post_feedforward_layernorm = make_norm(config)
        residual_mlp = config.moe_residual_mlp_size if config.is_moe_layer(layer) else 0
        self.residual_layernorm = make_norm(config) if residual_mlp else None
        self.residual_mlp = MLP(config, intermediate_size=residual_mlp, rngs=rngs) if residual_mlp else None

    def __call__(self, x: jax.Array, batch: Batch, kv_cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        scale = self.residual_multiplier
        if self.parallel_block != "none":
            h = self.input_layernorm(x)
            attn_out, kv_cache = self.self_attn(h, batch, kv_cache)
            mlp_in = h if self.parallel_block == "shared_norm" else self.post_attention_layernorm(x)
            return x + scale * (attn_out + self.mlp(mlp_in)), kv_cache
        if self.block_norms == "post_residual":
            attn_out, kv_cache = self.self_attn(x, batch, kv_cache)
            x = self.post_attention_layernorm(x + scale * attn_out)
            return self.post_feedforward_layernorm(x + scale * self.mlp(x)), kv_cache
        if self.block_norms == "post":
            attn_out, kv_cache = self.self_attn(x, batch, kv_cache)
            x = x + scale * self.post_attention_layernorm(attn_out)
            return x + scale * self.post_feedforward_layernorm(self.mlp(x)), kv_cache
        if self.residual_mlp is not None:
            attn_out, kv_cache = self.self_attn(self.input_layernorm(x), batch, kv_cache)
            h = x + scale * attn_out
            moe_out = self.mlp(self.post_attention_layernorm(x))
            return h + scale * (self.residual_mlp(self.residual_layernorm(h)) + moe_out), kv_cache
        if self.block_norms == "pre":
            mixer = self.self_attn if self.self_attn is not None else self.mixer
            if mixer is not None:
                attn_out, kv_cache = mixer(self.input_layernorm(x), batch, kv_cache)
                x = x + scale * attn_out
            if self.mlp is not None:
                x = x + scale * self.mlp(self.post_attention_layernorm(x))
            return x, kv_cache
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), batch, kv_cache)
        x = x + scale * self.post_attention_layernorm(attn_out)
        mlp_out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + scale * mlp_out, kv_cache


class SharedHead(nnx.Module):
    """An MTP block's output norm (`shared_head.norm`). The checkpoint's `shared_head.head` is a copy of
    the model's LM head and is not loaded: the draft uses the model's own, as transformers' `MtpModel` does."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = make_norm(config)


class MTPLayer(DecoderLayer):
    """One multi-token-prediction block (DeepSeek-V3, GLM-4.5), stored for speculative decoding and never run here.

    A decoder layer with the last layer's kinds (the MTP layers are MoE layers like every layer
    past `first_k_dense_replace`) plus what the MTP module adds: `enorm` on the next token's
    embedding and `hnorm` on the previous hidden state, `eh_proj` joining the two `[2E -> E]`,
    and `shared_head.norm`. Tensor names are the checkpoint's under `model.layers.{N + k}`; its
    copies of the embeddings and LM head (`embed_tokens`, `shared_head.head`; DeepSeek-V3 ships
    them, GLM-4.6 does not) are skipped, the model's own serve (`MTP_SHARED_COPIES`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, config.num_layers - 1, rngs=rngs)
        hidden = config.hidden_size
        common = dict(dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)
        self.enorm = make_norm(config)
        self.hnorm = make_norm(config)
        self.eh_proj = Linear(2 * hidden, hidden, axes=(None, "embed"), use_bias=False, **common)
        self.shared_head = SharedHead(config, rngs=rngs)


def head_logits(config: ModelConfig, lm_head: Linear | None, embed_tokens: Embed, hidden: jax.Array) -> jax.Array:
    """The model's output head on `hidden [..., E]` -> float32 logits `[..., V]`: `lm_head` (None: tied to
    `embed_tokens`), then the config's logit multiplier and final soft-cap (shared by the MTP draft)."""
    logits = embed_tokens.attend(hidden) if lm_head is None else lm_head(hidden)
    logits = logits.astype(jnp.float32)
    if config.logit_multiplier != 1.0:
        logits = logits * config.logit_multiplier
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return logits


class DecoderModel(nnx.Module):
    """Embeddings, the layer stack and the final norm (HF's `model.`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        common = dict(dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.embedding_multiplier = config.embedding_multiplier
        self.embed_tokens = Embed(config.vocab_size, config.embed_width, axes=("vocab", "embed"), **common)
        # Narrower token embeddings (OPT-350m) are projected to the hidden size and back.
        narrow, width = config.embedding_size is not None, config.embed_width
        project = dict(use_bias=False, dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.project_in = Linear(width, config.hidden_size, axes=(None, "embed"), **project) if narrow else None
        self.project_out = Linear(config.hidden_size, width, axes=("embed", None), **project) if narrow else None
        self.position_offset = config.position_offset
        self.embed_positions = (
            Embed(
                config.max_position_embeddings + config.position_offset,
                config.hidden_size,
                axes=("position", "embed"),
                **common,
            )
            if config.position_embedding == "learned"
            else None
        )
        self.embed_layernorm = make_norm(config) if config.embedding_norm else None
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.norm = make_norm(config) if config.final_norm else None
        self.remat = False  # recompute each layer's activations in the backward pass (training)
        # Set by a jitted step on a mesh: the residual stream is constrained to it at every block
        # boundary (training: `[B, T, E]` rows split over the data axes; serving: `[T, E]` replicated).
        self.activation_sharding = None

    def __call__(
        self,
        input_ids: jax.Array,
        batch: Batch,
        kv_caches: list[KVCache] | None = None,
        merged: MergedEmbeddings | None = None,
        capture: tuple[int, ...] = (),
    ) -> tuple[jax.Array, list[KVCache] | None] | tuple[jax.Array, list[KVCache] | None, jax.Array]:
        """Token ids (`[B, T]` or flat `[T]`) -> final hidden states and the updated KV pages.

        `merged`: encoder outputs (image features) that replace the embeddings of the tokens it indexes,
        and with DeepStack sets, rows added to the outputs of the first layers at the same tokens.
        `capture` (speculative drafts fed by hidden states): layer numbers whose input (HF's
        `hidden_states[i]`; `num_layers` = the final normed output) comes back third, concatenated
        `[..., len(capture) * E]` in the order given.
        """
        x = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            # Scale in the weight dtype, as the reference does (Gemma's sqrt(E) rounds in bf16).
            x = x * jnp.asarray(self.embedding_multiplier, x.dtype)
        if merged is not None:  # after the text-token scaling, which encoder outputs do not take
            x = merged.apply(x)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            x = x + self.embed_positions(batch.positions + self.position_offset)
        if self.embed_layernorm is not None:
            x = self.embed_layernorm(x)
        new_caches, captured, first = [], {}, 0
        deepstack = 0 if merged is None else merged.deepstack_layers
        for i, layer in enumerate(self.layers):
            span = getattr(layer, "num_layers", 1)  # a scanned segment runs several layers
            if any(first < c < first + span for c in capture):
                raise ValueError(f"cannot capture the input of a layer inside scanned layers {first}..{first + span - 1}; "
                                 "serve with scan_layers=False")
            if span > 1 and first < deepstack:
                raise ValueError(f"DeepStack adds to the outputs of layers 0..{deepstack - 1}, inside scanned layers "
                                 f"{first}..{first + span - 1} (scanned_view keeps them unrolled)")
            if first in capture:
                captured[first] = x
            first += span
            if self.remat and kv_caches is None:
                x, cache = nnx.remat(DecoderLayer.__call__)(layer, x, batch)
            else:
                x, cache = layer(x, batch, None if kv_caches is None else kv_caches[i])
            if first - span < deepstack:  # this entry is the single layer `first - span`
                x = merged.add_to_layer_output(x, first - span)
            if self.activation_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
            new_caches.append(cache)
        if self.norm is not None:
            x = self.norm(x)
        captured[first] = x
        if self.project_out is not None:
            x = self.project_out(x)
        caches = None if kv_caches is None else new_caches
        if capture:
            return x, caches, jnp.concatenate([captured[c] for c in capture], axis=-1)
        return x, caches


class CausalLM(nnx.Module):
    """Decoder plus LM head. `model(input_ids, attention_mask)` -> float32 logits `[B, T, V]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.embed_width,
                config.vocab_size,
                axes=("embed", "vocab"),
                use_bias=config.lm_head_bias,
                unit_norm_outputs=config.lm_head_unit_norm,
                dtype=jnp.dtype(config.dtype),
                init_std=config.initializer_range,
                rngs=rngs,
            )
        )
        mtp = [MTPLayer(config, rngs=rngs) for _ in range(config.num_mtp_layers)]
        self.mtp = nnx.List(mtp) if mtp else None  # stored for speculative decoding, not run

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states `[..., E]` -> float32 logits `[..., V]`."""
        return head_logits(self.config, self.lm_head, self.model.embed_tokens, hidden)

    def make_kv_caches(
        self,
        num_pages: int,
        page_size: int,
        dtype: jnp.dtype,
        sharding_fn: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
        num_slots: int = 1,
    ) -> list:
        """Zeroed serving caches in the layout `forward` expects; the serving engine treats them as opaque.

        One entry per entry of `model.layers`: the pool its layer's cache spec allocates
        (`model_lib/cache_spec.py`; a paged layer's `(k, v)` pages `[K, P, page_size, D]`, None for a
        layer without state), or for a `LayerScan` segment a tuple over its block's layers of pools
        stacked `repeats` deep. An int8 / float8 `dtype` makes each KV pool a `QuantizedPages`
        (`pallas_kernels/paged_attention/kv_quant.py`). `num_slots` rows are allocated for per-sequence
        (recurrent) state. `sharding_fn(logical axes, shape)` places each array.
        """
        sizes = PoolSizes(num_pages, page_size, num_slots)

        def pools(layer: int, repeats: int | None):
            spec = self.config.layer_cache_spec(layer)
            return None if spec is None else spec.allocate(sizes, dtype, sharding_fn, repeats)

        return [
            pools(start, None) if repeats == 1 else tuple(pools(start + j, repeats) for j in range(period))
            for start, period, repeats in segment_layers(self)
        ]

    def forward(
        self,
        input_ids: jax.Array,
        batch: Batch,
        kv_caches: list[KVCache] | None = None,
        logits_indices: jax.Array | None = None,
        merged: MergedEmbeddings | None = None,
        capture: tuple[int, ...] = (),
    ) -> tuple[jax.Array, list[KVCache] | None] | tuple[jax.Array, list[KVCache] | None, jax.Array]:
        """The family forward, for both batch shapes (DESIGN.md "one forward, two batch shapes").

        Dense `[B, T]` batches attend within the batch; a `PagedBatch` reads and
        writes the paged `kv_caches` (the layout of `make_kv_caches`). `logits_indices`
        picks the token positions (along the leading token axis) that need
        logits, so a decode step projects only the last token of each sequence. `merged` puts encoder
        outputs in place of the token embeddings it indexes (`model_lib/vision/merge.py`). `capture`:
        hidden states of every token come back third (`DecoderModel.__call__`).
        """
        hidden, kv_caches, *captured = self.model(input_ids, batch, kv_caches, merged, capture)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return (self.logits(hidden), kv_caches, *captured)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        merged: MergedEmbeddings | None = None,
        rope_positions: jax.Array | None = None,
        visible_until: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for a `[B, T]` batch.

        `attention_mask` (1 = token, 0 = padding; left or right) or `segment_ids`
        (packed rows, 0 = padding) say which tokens see which; positions restart
        at each sequence's first real token unless given. `merged`: encoder outputs in
        place of the token embeddings it indexes. `rope_positions [3, B, T]`: M-RoPE positions.
        `visible_until [B, T]`: bidirectional spans, the last position each token sees
        (`model_lib/spans.py`; `visible_until_from_span_ids` builds it).
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if visible_until is not None and (reason := self.config.spans_unsupported_reason(paged=False)):
            raise ValueError(f"this model cannot attend bidirectional spans: {reason}")
        batch = dense_batch(input_ids, attention_mask, segment_ids, positions, rope_positions, visible_until)
        if batch.visible_until is None and self.config.block_causal_size is not None:  # SDAR: every block is a span
            batch = batch.replace(visible_until=block_visible_until(batch.positions, self.config.block_causal_size))
        logits, _ = self.forward(input_ids, batch, merged=merged)
        return logits


def dense_batch(
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rope_positions: jax.Array | None = None,
    visible_until: jax.Array | None = None,
) -> DenseBatch:
    """The attention inputs of a `[B, T]` batch (`CausalLM.__call__` says what the arguments mean)."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    positions = positions_from_segments(segment_ids) if positions is None else jnp.asarray(positions, jnp.int32)
    seq_lens = jnp.broadcast_to(jnp.max(positions, axis=-1, keepdims=True) + 1, positions.shape)
    return DenseBatch(positions=positions, segment_ids=segment_ids, seq_lens=seq_lens,
                      rope_positions=None if rope_positions is None else jnp.asarray(rope_positions, jnp.int32),
                      visible_until=None if visible_until is None else jnp.asarray(visible_until, jnp.int32))
