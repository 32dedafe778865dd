"""The decoder-only transformer that every dense family in the registry composes.

Module and attribute names follow Hugging Face (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `lm_head`), so most checkpoints load by
identity and PEFT adapter keys line up. Families differ only through
`ModelConfig` fields; there is no per-family forward code.

Glossary: B batch, T tokens, E hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import MLP, Attention, DenseBatch, Embed, KVCache, Linear, PagedBatch, make_norm
from model_lib.layers.mla import MLAttention
from model_lib.layers.moe import MoE

Batch = DenseBatch | PagedBatch


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
    and the second norm of a `two_norms` parallel block.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.block_norms = config.block_norms
        self.parallel_block = config.parallel_block
        self.residual_multiplier = config.residual_multiplier
        self.self_attn = (MLAttention if config.attention_kind == "mla" else Attention)(config, layer, rngs=rngs)
        self.mlp = MoE(config, rngs=rngs) if config.is_moe_layer(layer) else MLP(config, rngs=rngs)
        self.input_layernorm = None if config.block_norms == "post" else make_norm(config)
        if config.parallel_block != "shared_norm":
            self.post_attention_layernorm = make_norm(config)
        if config.block_norms == "sandwich":
            self.pre_feedforward_layernorm = make_norm(config)
        if config.block_norms in ("sandwich", "post"):
            self.post_feedforward_layernorm = make_norm(config)

    def __call__(self, x: jax.Array, batch: Batch, kv_cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        scale = self.residual_multiplier
        if self.parallel_block != "none":
            h = self.input_layernorm(x)
            attn_out, kv_cache = self.self_attn(h, batch, kv_cache)
            mlp_in = h if self.parallel_block == "shared_norm" else self.post_attention_layernorm(x)
            return x + scale * (attn_out + self.mlp(mlp_in)), kv_cache
        if self.block_norms == "post":
            attn_out, kv_cache = self.self_attn(x, batch, kv_cache)
            x = x + scale * self.post_attention_layernorm(attn_out)
            return x + scale * self.post_feedforward_layernorm(self.mlp(x)), kv_cache
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), batch, kv_cache)
        if self.block_norms == "pre":
            x = x + scale * attn_out
            return x + scale * self.mlp(self.post_attention_layernorm(x)), kv_cache
        x = x + scale * self.post_attention_layernorm(attn_out)
        mlp_out = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + scale * mlp_out, kv_cache


class DecoderModel(nnx.Module):
    """Embeddings, the layer stack and the final norm (HF's `model.`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        common = dict(dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.embedding_multiplier = config.embedding_multiplier
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, axes=("vocab", "embed"), **common)
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

    def __call__(
        self, input_ids: jax.Array, batch: Batch, kv_caches: list[KVCache] | None = None
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """Token ids (`[B, T]` or flat `[T]`) -> final hidden states and the updated KV pages."""
        x = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            # Scale in the weight dtype, as the reference does (Gemma's sqrt(E) rounds in bf16).
            x = x * jnp.asarray(self.embedding_multiplier, x.dtype)
        if self.embed_positions is not None:
            x = x + self.embed_positions(batch.positions + self.position_offset)
        if self.embed_layernorm is not None:
            x = self.embed_layernorm(x)
        new_caches = []
        for i, layer in enumerate(self.layers):
            if self.remat and kv_caches is None:
                x, cache = nnx.remat(DecoderLayer.__call__)(layer, x, batch)
            else:
                x, cache = layer(x, batch, None if kv_caches is None else kv_caches[i])
            new_caches.append(cache)
        if self.norm is not None:
            x = self.norm(x)
        return x, (None if kv_caches is None else new_caches)


class CausalLM(nnx.Module):
    """Decoder plus LM head. `model(input_ids, attention_mask)` -> float32 logits `[B, T, V]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DecoderModel(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                use_bias=config.lm_head_bias,
                dtype=jnp.dtype(config.dtype),
                init_std=config.initializer_range,
                rngs=rngs,
            )
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states `[..., E]` -> float32 logits `[..., V]`."""
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        if self.config.logit_multiplier != 1.0:
            logits = logits * self.config.logit_multiplier
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: jax.Array,
        batch: Batch,
        kv_caches: list[KVCache] | None = None,
        logits_indices: jax.Array | None = None,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """The family forward, for both batch shapes (DESIGN.md "one forward, two batch shapes").

        Dense `[B, T]` batches attend within the batch; a `PagedBatch` reads and
        writes the paged `kv_caches` (one `(k, v)` per layer). `logits_indices`
        picks the token positions (along the leading token axis) that need
        logits, so a decode step projects only the last token of each sequence.
        """
        hidden, kv_caches = self.model(input_ids, batch, kv_caches)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.logits(hidden), kv_caches

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for a `[B, T]` batch.

        `attention_mask` (1 = token, 0 = padding; left or right) or `segment_ids`
        (packed rows, 0 = padding) say which tokens see which; positions restart
        at each sequence's first real token unless given.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        positions = positions_from_segments(segment_ids) if positions is None else jnp.asarray(positions, jnp.int32)
        seq_lens = jnp.broadcast_to(jnp.max(positions, axis=-1, keepdims=True) + 1, positions.shape)
        logits, _ = self.forward(input_ids, DenseBatch(positions=positions, segment_ids=segment_ids, seq_lens=seq_lens))
        return logits
