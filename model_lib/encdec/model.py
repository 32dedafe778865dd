"""The encoder-decoder Transformer of BART, MBart, T5 / MT5, FSMT and Whisper (`config.py` says how they differ).

Two batch shapes, as the decoder-only families (DESIGN.md "One forward, two batch shapes"):
- dense: `model(source, attention_mask, decoder_input_ids, decoder_attention_mask)` -> logits
  `[B, T, V]` for right-padded batches (tests, training); `source` is the encoder's input: token ids
  `[B, S]` with their mask, or a features encoder's (Whisper's) log-mel `[B, M, 2S]` with mask None;
- serving: `fill_cross` (token ids) or `fill_cross_features` (log-mel features) runs the encoder for one
  sequence and stores every decoder layer's cross K/V in the sequence's slot (`CrossKV`); `forward` then
  runs the decoder over a ragged paged step, its self-attention in the paged pools, its cross attention
  over the slot's rows.

Parameter paths follow BART's names (`model.encoder.layers.N.self_attn.q_proj`, `encoder_attn`,
`fc1`, `final_layer_norm`; Whisper's `conv1`, `conv2` on the encoder); T5 keeps its projection names (`q`,
`k`, `v`, `o`, `wi`, `wo`) so PEFT targets match, and `weights.py` maps its block layout onto these paths.

Glossary: B batch, S source tokens (a features encoder: frames after its stride-2 conv), T target tokens,
E d_model, H heads, D head_dim, F feed-forward, M mel bins.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib import parallel
from model_lib.cache_spec import PoolSizes
from model_lib.encdec.config import Seq2SeqConfig
from model_lib.layers import PagedBatch
from model_lib.layers.activations import ACTIVATIONS, activation
from model_lib.layers.conv import Conv1d
from model_lib.layers.embedding import Embed
from model_lib.layers.linear import Linear
from model_lib.layers.norms import LayerNorm, RMSNorm
from pallas_kernels.cross_attention import cross_attention, write_cross
from pallas_kernels.paged_attention.reference import token_layout
from pallas_kernels.position_bias import RelativePositionBias

ATTENTION_NAMES = {"t5": ("q", "k", "v", "o")}  # others: BART's
BART_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linear(config: Seq2SeqConfig, features_in: int, features_out: int, axes, rngs: nnx.Rngs, head_size: int = 1,
            use_bias: bool = True):
    return Linear(features_in, features_out, axes=axes, use_bias=config.attention_bias and use_bias,
                  dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs, head_size=head_size)


def _norm(config: Seq2SeqConfig) -> LayerNorm | RMSNorm:
    shape, dtype = (config.d_model,), jnp.dtype(config.dtype)
    if config.norm_kind == "rms":
        return RMSNorm(shape, eps=config.norm_eps, weight_offset=0.0, dtype=dtype)
    return LayerNorm(shape, eps=config.norm_eps, use_bias=True, weight_offset=0.0, dtype=dtype)


def _embed(config: Seq2SeqConfig, rows: int, rngs: nnx.Rngs, axes=("vocab", "embed")) -> Embed:
    return Embed(rows, config.d_model, axes=axes, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range,
                 rngs=rngs)


class MultiHeadAttention(nnx.Module):
    """Projections of self- or cross-attention; the attention itself is the caller's (dense or paged)."""

    def __init__(self, config: Seq2SeqConfig, num_heads: int, *, rngs: nnx.Rngs):
        self.names = ATTENTION_NAMES.get(config.kind, BART_ATTENTION)
        self.num_heads, self.head_dim, self.scale = num_heads, config.head_dim, config.query_scale
        inner = num_heads * config.head_dim
        shapes = ((config.d_model, inner, ("embed", "q_heads")), (config.d_model, inner, ("embed", "kv_heads")),
                  (config.d_model, inner, ("embed", "kv_heads")), (inner, config.d_model, ("q_heads", "embed")))
        for i, (name, (n_in, n_out, axes)) in enumerate(zip(self.names, shapes)):
            bias = i != 1 or config.key_bias
            setattr(self, name, _linear(config, n_in, n_out, axes, rngs, config.head_dim, use_bias=bias))

    def project(self, which: int, x: jax.Array) -> jax.Array:
        """q (0), k (1) or v (2) of `x [..., E]` -> `[..., H, D]`."""
        return getattr(self, self.names[which])(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def output(self, heads: jax.Array) -> jax.Array:
        return getattr(self, self.names[3])(heads.reshape(*heads.shape[:-2], self.num_heads * self.head_dim))


class Layer(nnx.Module):
    """One encoder layer (self-attention, feed-forward) or decoder layer (+ cross attention `encoder_attn`)."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool, *, rngs: nnx.Rngs):
        self.pre_norm = config.pre_norm
        heads = config.decoder_heads if decoder else config.encoder_heads
        self.self_attn = MultiHeadAttention(config, heads, rngs=rngs)
        self.self_attn_layer_norm = _norm(config)
        self.encoder_attn = MultiHeadAttention(config, heads, rngs=rngs) if decoder else None
        self.encoder_attn_layer_norm = _norm(config) if decoder else None
        # The feed-forward projections sit on the layer, under their HF names: BART's `fc2(act(fc1 x))`,
        # T5's `wo(act(wi x))` or gated `wo(act(wi_0 x) * wi_1 x)`.
        self.act = activation(config.activation)
        if config.kind != "t5":
            self.ffn_names = ("fc1", None, "fc2")
        else:
            self.ffn_names = ("wi_0", "wi_1", "wo") if config.gated_ffn else ("wi", None, "wo")
        ffn = config.decoder_ffn if decoder else config.encoder_ffn
        for name, n_in, n_out, axes in zip(self.ffn_names, (config.d_model, config.d_model, ffn), (ffn, ffn, config.d_model),
                                           (("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed"))):
            if name is not None:
                setattr(self, name, _linear(config, n_in, n_out, axes, rngs))
        self.final_layer_norm = _norm(config)

    def feed_forward(self, x: jax.Array) -> jax.Array:
        up, gate, down = self.ffn_names
        h = self.act(getattr(self, up)(x))
        if gate is not None:
            h = h * getattr(self, gate)(x)
        return getattr(self, down)(h)

    def sublayer(self, x: jax.Array, norm: nnx.Module, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """Pre-LN `x + fn(norm(x))` or post-LN `norm(x + fn(x))`."""
        return x + fn(norm(x)) if self.pre_norm else norm(x + fn(x))

    def __call__(self, x: jax.Array, self_attend: Callable, cross_attend: Callable | None = None) -> jax.Array:
        """`self_attend(attention module, normed x) -> [..., E]`; `cross_attend` likewise (decoders)."""
        x = self.sublayer(x, self.self_attn_layer_norm, lambda h: self_attend(self.self_attn, h))
        if cross_attend is not None:
            x = self.sublayer(x, self.encoder_attn_layer_norm, lambda h: cross_attend(self.encoder_attn, h))
        return self.sublayer(x, self.final_layer_norm, self.feed_forward)


class Stack(nnx.Module):
    """Embeddings (a features encoder: its convolutions), layers and final norm of the encoder or the decoder."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool, *, rngs: nnx.Rngs):
        self.decoder = decoder
        self.embed_scale = config.embed_scale
        self.position_offset = config.position_offset
        self.relative_max_distance = config.relative_max_distance
        features = config.features_encoder and not decoder
        vocab = config.vocab_size if decoder else config.src_vocab_size
        self.embed_tokens = None if config.shared_embeddings or features else _embed(config, vocab, rngs)
        # Whisper's stem: `gelu(conv2(gelu(conv1 x)))`, 2S frames -> S.
        conv = dict(padding=1, axes=(None, "embed"), dtype=jnp.dtype(config.dtype), init_std=config.initializer_range,
                    rngs=rngs)
        self.conv1 = Conv1d(config.num_mel_bins, config.d_model, 3, **conv) if features else None
        self.conv2 = Conv1d(config.d_model, config.d_model, 3, stride=2, **conv) if features else None
        learned = config.position_offset is not None
        length = config.max_position_embeddings if decoder else config.max_source_len
        rows = (length + config.position_offset) if learned else 0
        self.embed_positions = _embed(config, rows, rngs, ("position", "embed")) if learned else None
        self.relative_attention_bias = None if learned else nnx.Param(
            (jax.random.normal(rngs.params(), (config.relative_buckets, config.decoder_heads)) * 0.02).astype(config.dtype),
            logical_axes=(None, "q_heads"))
        self.layernorm_embedding = _norm(config) if config.embed_norm else None
        count = config.decoder_layers if decoder else config.encoder_layers
        self.layers = nnx.List([Layer(config, decoder, rngs=rngs) for _ in range(count)])
        self.layer_norm = _norm(config) if config.final_norm else None

    def embed(self, table: Embed, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        x = table(input_ids)
        if self.embed_scale != 1.0:
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        return self.add_positions(x, positions)

    def embed_features(self, features: jax.Array) -> jax.Array:
        """Log-mel `features [B, M, 2S]` -> `[B, S, E]` (a features encoder)."""
        gelu = ACTIVATIONS["gelu"]  # transformers' exact `nn.functional.gelu`, whatever the layers' activation
        x = gelu(self.conv2(gelu(self.conv1(jnp.swapaxes(features, 1, 2)))))  # [B, 2S, M] -> [B, S, E]
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return self.add_positions(x, positions)

    def add_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.position_offset)
        return x if self.layernorm_embedding is None else self.layernorm_embedding(x)

    def position_bias(self) -> RelativePositionBias | None:
        if self.relative_attention_bias is None:
            return None
        return RelativePositionBias(self.relative_attention_bias[...], not self.decoder, self.relative_max_distance)

    def finish(self, x: jax.Array) -> jax.Array:
        return x if self.layer_norm is None else self.layer_norm(x)


class Seq2SeqModel(nnx.Module):
    def __init__(self, config: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.shared = _embed(config, config.vocab_size, rngs) if config.shared_embeddings else None
        self.encoder = Stack(config, decoder=False, rngs=rngs)
        self.decoder = Stack(config, decoder=True, rngs=rngs)

    def tokens(self, stack: Stack) -> Embed:
        return self.shared if self.shared is not None else stack.embed_tokens


def _dense_attention(attn: MultiHeadAttention, x: jax.Array, memory: jax.Array, q_segments: jax.Array,
                     kv_segments: jax.Array, *, causal: bool, bias: RelativePositionBias | None) -> jax.Array:
    """Attention of `x [B, T, E]` over `memory [B, S, E]` (itself for self-attention)."""
    q, k, v = attn.project(0, x), attn.project(1, memory), attn.project(2, memory)
    q_pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    kv_pos = jnp.broadcast_to(jnp.arange(memory.shape[1], dtype=jnp.int32), memory.shape[:2])
    extra = {} if bias is None else {"position_bias": bias}
    out = parallel.dense_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_segments,
                                   kv_segment_ids=kv_segments, scale=attn.scale, sliding_window=None, softcap=None,
                                   causal=causal, **extra)
    return attn.output(out)


def _source_segments(attention_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """Segment ids `[B, S]` of the encoder's positions: its mask, or all real (a features encoder)."""
    return jnp.ones(shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)


class _PagedSelfAttention:
    """Decoder self-attention over the paged pools of one layer; keeps the pools it wrote."""

    def __init__(self, kv_cache: tuple, batch: PagedBatch, options: dict):
        self.kv_cache, self.batch, self.options = kv_cache, batch, options

    def __call__(self, attn: MultiHeadAttention, h: jax.Array) -> jax.Array:
        out, k_cache, v_cache = parallel.paged_attention(attn.project(0, h), attn.project(1, h), attn.project(2, h),
                                                         *self.kv_cache, self.batch.meta, **self.options)
        self.kv_cache = (k_cache, v_cache)
        return attn.output(out)


class Seq2SeqLM(nnx.Module):
    """`BartForConditionalGeneration` and its relatives: `model` (encoder, decoder), output head."""

    def __init__(self, config: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Seq2SeqModel(config, rngs=rngs)
        self.lm_head = None if config.tie_output else Linear(
            config.d_model, config.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=jnp.dtype(config.dtype),
            init_std=config.initializer_range, rngs=rngs)
        self.final_logits_bias = (nnx.Param(jnp.zeros((1, config.vocab_size), config.dtype), logical_axes=(None, "vocab"))
                                  if config.final_logits_bias else None)

    # -- shared pieces ----------------------------------------------------------
    def logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder output `[..., E]` -> float32 logits `[..., V]`."""
        if self.config.output_scale != 1.0:
            hidden = hidden * jnp.asarray(self.config.output_scale, hidden.dtype)
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            logits = self.model.tokens(self.model.decoder).attend(hidden)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias[...][0]
        return logits.astype(jnp.float32)

    def check_source(self, source: jax.Array, attention_mask: jax.Array | None) -> None:
        """ValueError for an encoder input of the wrong kind or shape (static shapes: checked when traced)."""
        config = self.config
        if not config.features_encoder:
            if source.ndim != 2 or attention_mask is None or attention_mask.shape != source.shape:
                raise ValueError(f"{config.architecture} encodes token ids [B, S] with a mask of their shape, got "
                                 f"{source.shape} and {None if attention_mask is None else attention_mask.shape}")
            return
        want = config.feature_shape
        if source.ndim != 3 or source.shape[1:] != want:
            raise ValueError(f"{config.architecture} encodes log-mel features [B, {want[0]}, {want[1]}] (exactly "
                             f"2 * max_source_len frames, padded as its feature extractor pads), got {source.shape}")
        if attention_mask is not None:
            raise ValueError(f"{config.architecture} attends to every frame: pass attention_mask None")

    def encode(self, source: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final encoder states `[B, S, E]` of right-padded source ids with their mask `[B, S]`, or of log-mel
        features `[B, M, 2S]` without one (a features encoder: every frame is real)."""
        self.check_source(source, attention_mask)
        stack = self.model.encoder
        if self.config.features_encoder:
            x = stack.embed_features(source)
        else:
            positions = jnp.broadcast_to(jnp.arange(source.shape[1], dtype=jnp.int32), source.shape)
            x = stack.embed(self.model.tokens(stack), source, positions)
        segments = _source_segments(attention_mask, x.shape[:2])
        bias = stack.position_bias()
        attend = lambda attn, h: _dense_attention(attn, h, h, segments, segments, causal=False, bias=bias)  # noqa: E731
        for layer in stack.layers:
            x = layer(x, attend)
        return stack.finish(x)

    def __call__(self, source: jax.Array, attention_mask: jax.Array | None, decoder_input_ids: jax.Array,
                 decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits `[B, T, V]` (float32) of right-padded target batches over their sources: token
        ids `[B, S]` with `attention_mask`, or a features encoder's log-mel `[B, M, 2S]` with None (`encode`)."""
        memory = self.encode(source, attention_mask)
        kv_segments = _source_segments(attention_mask, memory.shape[:2])
        stack = self.model.decoder
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(decoder_input_ids.shape[1], dtype=jnp.int32), decoder_input_ids.shape)
        x = stack.embed(self.model.tokens(stack), decoder_input_ids, positions)
        q_segments = decoder_attention_mask.astype(jnp.int32)
        bias = stack.position_bias()
        self_attend = lambda attn, h: _dense_attention(  # noqa: E731
            attn, h, h, q_segments, q_segments, causal=True, bias=bias)
        # Every decoder row (padding rows included) sees its source: segment 1 on both sides.
        cross_attend = lambda attn, h: _dense_attention(  # noqa: E731
            attn, h, memory, jnp.ones_like(q_segments), kv_segments, causal=False, bias=None)
        for layer in stack.layers:
            x = layer(x, self_attend, cross_attend)
        return self.logits(stack.finish(x))

    # -- serving ---------------------------------------------------------------------
    def make_kv_caches(self, num_pages: int, page_size: int, dtype: jnp.dtype, sharding_fn=None,
                       num_slots: int = 1) -> list:
        """Per decoder layer `((k_pages, v_pages), (cross_k, cross_v, cross_lengths))` (`LayerSpecs`)."""
        sizes = PoolSizes(num_pages, page_size, num_slots)
        return [self.config.layer_cache_spec(i).allocate(sizes, dtype, sharding_fn)
                for i in range(self.config.decoder_layers)]

    def fill_cross(self, kv_caches: list, input_ids: jax.Array, length: jax.Array, slot: jax.Array) -> list:
        """Run the encoder on one sequence's source `input_ids [S']` (real up to `length`) and store each
        decoder layer's cross K/V in `slot`'s rows."""
        mask = (jnp.arange(input_ids.shape[0]) < length)[None]
        return self._write_cross(kv_caches, self.encode(input_ids[None], mask)[0], length, slot)

    def fill_cross_features(self, kv_caches: list, input_features: jax.Array, slot: jax.Array) -> list:
        """`fill_cross` of a features encoder: one sequence's log-mel `input_features [M, 2S]` (S =
        max_source_len, all of it real) -> each decoder layer's cross K/V of its S frames in `slot`'s rows."""
        memory = self.encode(input_features[None])[0]  # [S, E]
        return self._write_cross(kv_caches, memory, jnp.int32(memory.shape[0]), slot)

    def _write_cross(self, kv_caches: list, memory: jax.Array, length: jax.Array, slot: jax.Array) -> list:
        """Every decoder layer's cross K/V of `memory [S', E]` (real up to `length`) into `slot`'s rows."""
        filled = []
        for layer, (self_kv, (k_pool, v_pool, lengths)) in zip(self.model.decoder.layers, kv_caches):
            attn = layer.encoder_attn
            cross = write_cross(k_pool, v_pool, lengths, slot, attn.project(1, memory), attn.project(2, memory), length)
            filled.append((self_kv, cross))
        return filled

    def forward(self, input_ids: jax.Array, batch: PagedBatch, kv_caches: list, logits_indices: jax.Array | None = None):
        """The decoder over a ragged paged step `[T]`; logits of `logits_indices` and the updated caches."""
        stack = self.model.decoder
        x = stack.embed(self.model.tokens(stack), input_ids, batch.positions)
        seq, _, _ = token_layout(batch.meta, input_ids.shape[0])
        token_slots = batch.slots[seq]
        bias = stack.position_bias()
        options = {"scale": stack.layers[0].self_attn.scale} | ({} if bias is None else {"position_bias": bias})
        updated = []
        for layer, (self_kv, cross) in zip(stack.layers, kv_caches):
            self_attend = _PagedSelfAttention(self_kv, batch, options)
            cross_attend = lambda attn, h, cross=cross: attn.output(  # noqa: E731
                cross_attention(attn.project(0, h), *cross, token_slots, scale=attn.scale))
            x = layer(x, self_attend, cross_attend)
            updated.append((self_attend.kv_cache, cross))
        hidden = stack.finish(x)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.logits(hidden), updated
