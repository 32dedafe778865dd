"""BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa) and their sequence-classification heads.

Attribute names are Hugging Face's (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
`attention.output.LayerNorm`, `intermediate.dense`, `output.dense`, `pooler.dense`, `classifier`), so a
checkpoint loads by identity (`model_lib/encoders/loading.py`). Post-LN blocks; attention is
bidirectional within each row's real tokens (`causal=False` in the dense attention op), which is the
padding mask of a padded batch.

Glossary: B batch, T tokens, E hidden, H heads, D head_dim, I intermediate, L labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib import parallel
from model_lib.encoders.config import EncoderConfig
from model_lib.layers.activations import activation
from model_lib.layers.embedding import Embed
from model_lib.layers.linear import Linear
from model_lib.layers.norms import LayerNorm


def _linear(config: EncoderConfig, features_in: int, features_out: int, axes, rngs: nnx.Rngs) -> Linear:
    return Linear(features_in, features_out, axes=axes, use_bias=True, dtype=jnp.dtype(config.dtype),
                  init_std=config.initializer_range, rngs=rngs)


def _layer_norm(config: EncoderConfig) -> LayerNorm:
    return LayerNorm((config.hidden_size,), eps=config.layer_norm_eps, use_bias=True, weight_offset=0.0,
                     dtype=jnp.dtype(config.dtype))


def encoder_positions(attention_mask: jax.Array, offset: int) -> jax.Array:
    """`[B, T]` learned-position ids: each row's real tokens count from `offset` (RoBERTa's pad + 1)."""
    mask = attention_mask.astype(jnp.int32)
    return (jnp.cumsum(mask, axis=-1) - 1) * mask + offset


class Embeddings(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)
        self.word_embeddings = Embed(config.vocab_size, config.hidden_size, axes=("vocab", "embed"), **common)
        self.position_embeddings = Embed(config.max_position_embeddings, config.hidden_size, axes=("position", "embed"), **common)
        self.token_type_embeddings = Embed(config.type_vocab_size, config.hidden_size, axes=(None, "embed"), **common)
        self.LayerNorm = _layer_norm(config)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class SelfAttention(nnx.Module):
    """HF's `attention.self`: the q/k/v projections."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        e = config.hidden_size
        self.query = _linear(config, e, e, ("embed", "q_heads"), rngs)
        self.key = _linear(config, e, e, ("embed", "kv_heads"), rngs)
        self.value = _linear(config, e, e, ("embed", "kv_heads"), rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = (proj(x).reshape(b, t, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value))
        out = parallel.dense_attention(  # [B,T,H,D]
            q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids, scale=self.head_dim**-0.5, sliding_window=None, softcap=None, causal=False,
        )
        return out.reshape(b, t, self.num_heads * self.head_dim)


class DenseNorm(nnx.Module):
    """HF's `attention.output` / `output`: `LayerNorm(residual + dense(x))`."""

    def __init__(self, config: EncoderConfig, features_in: int, *, rngs: nnx.Rngs):
        self.dense = _linear(config, features_in, config.hidden_size, ("mlp", "embed"), rngs)
        self.LayerNorm = _layer_norm(config)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(residual + self.dense(x))


class AttentionBlock(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        setattr(self, "self", SelfAttention(config, rngs=rngs))  # HF's name
        self.output = DenseNorm(config, config.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.output(getattr(self, "self")(x, positions, segment_ids), x)


class Intermediate(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.intermediate_size, ("embed", "mlp"), rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.dense(x))


class EncoderLayer(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.attention = AttentionBlock(config, rngs=rngs)
        self.intermediate = Intermediate(config, rngs=rngs)
        self.output = DenseNorm(config, config.intermediate_size, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        x = self.attention(x, positions, segment_ids)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])


class Pooler(nnx.Module):
    """BERT's pooler: `tanh(dense(h[:, 0]))`."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, ("embed", None), rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class EncoderModel(nnx.Module):
    """HF's BertModel / RobertaModel / XLMRobertaModel: `[B, T]` ids -> final hidden states `[B, T, E]`."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.position_offset = config.position_offset
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.pooler = Pooler(config, rngs=rngs) if config.has_pooler else None

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = encoder_positions(attention_mask, self.position_offset)
        segment_ids = attention_mask.astype(jnp.int32)
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, positions, segment_ids)
        return x


class RobertaClassificationHead(nnx.Module):
    """`out_proj(tanh(dense(h[:, 0])))`."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, ("embed", None), rngs)
        self.out_proj = _linear(config, config.hidden_size, config.num_labels, (None, None), rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(hidden[:, 0])))


class EncoderForSequenceClassification(nnx.Module):
    """BertForSequenceClassification (`bert.` + `classifier` on the pooler) and the RoBERTa / XLM-R ones
    (`roberta.` + `classifier.dense` / `classifier.out_proj` on the first token)."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.base_name = "bert" if config.head == "bert" else "roberta"
        setattr(self, self.base_name, EncoderModel(config, rngs=rngs))
        if config.head == "bert":
            self.classifier = _linear(config, config.hidden_size, config.num_labels, ("embed", None), rngs)
        else:
            self.classifier = RobertaClassificationHead(config, rngs=rngs)

    @property
    def base(self) -> EncoderModel:
        return getattr(self, self.base_name)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states `[B, T, E]` -> float32 class logits `[B, L]`."""
        if isinstance(self.classifier, Linear):
            return self.classifier(self.base.pooler(hidden)).astype(jnp.float32)
        return self.classifier(hidden).astype(jnp.float32)
