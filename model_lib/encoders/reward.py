"""Qwen2 reward models: the Qwen2 decoder with a value head instead of the LM head.

`Qwen2ForRewardModel` (Qwen2.5-Math-RM) and `Qwen2ForProcessRewardModel` (Qwen2.5-Math-PRM) ship as
remote code with the same head, `score = Sequential(Linear(E, E), ReLU(), Linear(E, L))` on every
token's final hidden state: L = 1 (a reward; the published forward reads the last real token's) and
L = 2 (per-step "wrong / right" logits; vLLM reports their softmax). Tensors `model.*` load as the
Qwen2 family's; the head is `score.0` and `score.2`.

Glossary: B batch, T tokens, E hidden, L labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.decoder import DecoderModel, positions_from_segments
from model_lib.layers import DenseBatch
from model_lib.layers.linear import Linear

REWARD_LABELS = {"Qwen2ForRewardModel": 1, "Qwen2ForProcessRewardModel": 2}


def decoder_hidden_states(model: DecoderModel, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """`[B, T]` ids (right-padded; mask 1 = token) -> a decoder's final hidden states `[B, T, E]` (causal)."""
    segment_ids = attention_mask.astype(jnp.int32)
    positions = positions_from_segments(segment_ids)
    seq_lens = jnp.broadcast_to(jnp.max(positions, axis=-1, keepdims=True) + 1, positions.shape)
    hidden, _ = model(input_ids, DenseBatch(positions=positions, segment_ids=segment_ids, seq_lens=seq_lens))
    return hidden


class DecoderEmbedder(nnx.Module):
    """A causal LM's final hidden states for pooling (vLLM's decoder embedding models): it holds the
    serving model itself, so generation and embeddings share one copy of the weights."""

    def __init__(self, lm: nnx.Module):
        self.lm = lm

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        return decoder_hidden_states(self.lm.model, input_ids, attention_mask)


class RewardModel(nnx.Module):
    def __init__(self, config: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.config = config
        self.num_labels = num_labels
        self.model = DecoderModel(config, rngs=rngs)
        common = dict(use_bias=True, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)
        e = config.hidden_size
        self.score = nnx.List([Linear(e, e, axes=("embed", None), **common), None,
                               Linear(e, num_labels, axes=(None, None), **common)])

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return decoder_hidden_states(self.model, input_ids, attention_mask)

    def token_scores(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, E]` -> float32 value-head outputs `[B, T, L]`."""
        first, _, last = self.score
        return last(jax.nn.relu(first(hidden))).astype(jnp.float32)
