"""Mllama (`MllamaForConditionalGeneration`, Llama 3.2 11B / 90B Vision): a Llama decoder that reads images
through cross-attention layers instead of placeholder embeddings.

The language model is the registry's Llama decoder (`model.layers.N`, `lm_head`) with the layers named by
`cross_attention_layers` replaced by `MllamaCrossAttentionDecoderLayer`s: RMS-normed queries and keys per
head, attention over the image features, then the MLP, each branch scaled by tanh of a learned gate. The
token table has `vocab_size + 8` rows (the `<|image|>` token lies past the output vocabulary). The tiled
vision model (`mllama_vision.py`) and `multi_modal_projector` (one linear layer) turn each image into
`T * P` feature rows; a sequence's cross keys and values are those of all its images, tiles in order.

Which image tiles a text token sees is the processor's `cross_attention_mask [B, L, I, T]`. transformers'
quirks are kept: a token that sees no tile (before the first `<|image|>`) attends, unmasked, over every
feature row of its sequence, padding tiles included, and its MLP branch is zeroed
(`full_text_row_masked_out_mask`); a sequence without images skips the cross-attention layers.

Serving: each cross-attention layer keeps a `CrossKV` pool with one segment of `R = T * P` rows per image
(`max_images` per slot), written when the sequence takes its slot (`fill_image_kv`,
`serving/multimodal/mllama.py`); per image the pool holds the positions `[start, end)` that see it and its
real rows, and a paged step derives each token's mask from its position (`segment_visibility`).

Glossary: B batch, L text tokens, I images per sequence, T tiles per image, P tokens per tile, S = I*T*P
feature rows, M = B*L query rows, E text width, H heads, K kv heads, D head width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from model_lib.cache_spec import CrossKV
from model_lib.config import ModelConfig
from model_lib.decoder import CausalLM, dense_batch
from model_lib.layers import MLP, DenseBatch, Embed, Linear, PagedBatch, make_norm
from model_lib.vision.config import ImagePlaceholders
from model_lib.vision.mllama_vision import MllamaVisionConfig, MllamaVisionModel
from pallas_kernels.cross_attention import cross_attention, dense_cross_attention, write_cross
from pallas_kernels.paged_attention.reference import token_layout

EXTRA_TOKEN_ROWS = 8  # transformers' `embed_tokens` rows past vocab_size (`<|image|>` among them)
IMAGE_TOKEN = "<|image|>"  # the processor's image token


@dataclass(frozen=True)
class MllamaConfig(ImagePlaceholders):
    """The vision model, the image token and the decoder layers that attend to the images.

    Serving settings (not in the checkpoint): `max_images`, the images per prompt each slot's cross-attention
    pools hold (`with_image_limit`: the server's image limit), and `bos_token`, the tokenizer's BOS text,
    which the processor puts in front of a prompt with images (`prompt_text`)."""

    vision: MllamaVisionConfig
    image_token_id: int
    cross_attention_layers: tuple[int, ...]
    max_images: int = 1
    bos_token: str | None = None

    prompt_tokens: ClassVar[dict[str, str]] = {"image_token_id": IMAGE_TOKEN}
    # Every image costs each slot `image_rows` rows per cross-attention layer (6404 for Llama 3.2 Vision), and
    # the checkpoints are tuned on one image per prompt.
    default_image_limit: ClassVar[int] = 1

    @property
    def image_rows(self) -> int:
        """R: cross-attention rows per image (every tile, padding tiles included, as transformers keeps them)."""
        return self.vision.max_num_tiles * self.vision.tile_tokens

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        return [self.image_token_id]  # one `<|image|>` per image: its features enter by cross attention

    def with_tokenizer(self, tokenizer: Any) -> "MllamaConfig":
        return dataclasses.replace(super().with_tokenizer(tokenizer), bos_token=tokenizer.bos_token)

    def with_image_limit(self, limit: int) -> "MllamaConfig":
        return dataclasses.replace(self, max_images=max(limit, 1))

    def prompt_text(self, text: str) -> str:
        """BOS after any leading `<|image|>` tokens unless the prompt has one (`MllamaProcessor`)."""
        from transformers.models.mllama.processing_mllama import build_string_from_input

        return text if self.bos_token is None else build_string_from_input(text, self.bos_token, IMAGE_TOKEN)

    def check_processor(self, processor: Any) -> None:
        size = processor.size
        side = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        tiles = getattr(processor, "max_image_tiles", None)
        if tiles != self.vision.max_num_tiles or side != (self.vision.image_size,) * 2:
            raise ValueError(f"the image processor makes up to {tiles} tiles of {side[0]}x{side[1]} pixels; the vision "
                             f"model takes up to {self.vision.max_num_tiles} of {self.vision.image_size} pixels")

    def cross_cache_spec(self, config: ModelConfig, layer: int) -> CrossKV | None:
        if layer not in self.cross_attention_layers:
            return None
        return CrossKV(config.num_kv_heads, config.head_dim, self.max_images * self.image_rows, config.dtype,
                       segments=self.max_images)


@struct.dataclass
class CrossInputs:
    """One cross-attention layer's keys and values per sequence and what each query row sees of them.

    `k`, `v` `[N, S, K, D]` and `lengths [N]` (rows past a sequence's length are padding; 0: no image), in
    the layout of a `CrossKV` pool and its lengths; `token_slots [M]` names each query row's sequence,
    `visible [M, S]` its keys, `text_rows [M]` (1.0 / 0.0) whether its MLP branch counts. `dense`: the rows
    are a dense batch's, sequence by sequence (M = N * L), and attend to their sequence's keys in place."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    token_slots: jax.Array
    visible: jax.Array
    text_rows: jax.Array
    dense: bool = struct.field(pytree_node=False, default=False)


class MllamaCrossAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        common = dict(use_bias=False, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs,
                      head_size=self.head_dim)
        self.q_proj = Linear(hidden, q_dim, axes=("embed", "q_heads"), **common)
        self.k_proj = Linear(hidden, kv_dim, axes=("embed", "kv_heads"), **common)
        self.v_proj = Linear(hidden, kv_dim, axes=("embed", "kv_heads"), **common)
        self.o_proj = Linear(q_dim, hidden, axes=("q_heads", "embed"), **common)
        self.q_norm = make_norm(config, self.head_dim)
        self.k_norm = make_norm(config, self.head_dim)

    def keys_values(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projected image features `[..., S, E]` -> keys (normed) and values `[..., S, K, D]`."""
        lead = features.shape[:-1]
        k = self.k_proj(features).reshape(*lead, self.num_kv_heads, self.head_dim)
        return self.k_norm(k), self.v_proj(features).reshape(*lead, self.num_kv_heads, self.head_dim)

    def __call__(self, x: jax.Array, cross: CrossInputs) -> jax.Array:
        """`x [M, E]` -> `[M, E]`."""
        q = self.q_norm(self.q_proj(x).reshape(x.shape[0], self.num_heads, self.head_dim))
        if cross.dense:  # [N, L, H, D] over each sequence's own keys
            n, s = cross.k.shape[:2]
            out = dense_cross_attention(q.reshape(n, -1, *q.shape[1:]), cross.k, cross.v, cross.lengths,
                                        scale=self.scale, kv_mask=cross.visible.reshape(n, -1, s))
        else:
            out = cross_attention(q, cross.k, cross.v, cross.lengths, cross.token_slots, scale=self.scale,
                                  kv_mask=cross.visible)
        return self.o_proj(out.reshape(x.shape[0], -1))


def _gate(config: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.zeros((1,), jnp.dtype(config.dtype)))


class MllamaCrossAttentionDecoderLayer(nnx.Module):
    """Tanh-gated cross attention and MLP; the identity for rows whose sequence has no image."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.tile_tokens = config.multimodal.vision.tile_tokens
        self.cross_attn = MllamaCrossAttention(config, rngs=rngs)
        self.input_layernorm = make_norm(config)
        self.cross_attn_attn_gate = _gate(config)
        self.mlp = MLP(config, layer, rngs=rngs)
        self.post_attention_layernorm = make_norm(config)
        self.cross_attn_mlp_gate = _gate(config)

    def __call__(self, x: jax.Array, batch: DenseBatch | PagedBatch,
                 cross: CrossInputs | tuple | None = None) -> tuple[jax.Array, CrossInputs | tuple | None]:
        """`x [B, L, E]` with `CrossInputs` (None: no sequence has an image), or a paged step's `[T, E]` with the
        layer's `CrossKV` pools `(k, v, lengths, segments)`, which come back unchanged."""
        if cross is None:
            return x, None
        inputs = cross if isinstance(cross, CrossInputs) else self.paged_inputs(cross, batch, x.shape[0])
        flat = x.reshape(-1, x.shape[-1])  # [M, E]
        gate = lambda g: jnp.tanh(g[...]).astype(x.dtype)  # noqa: E731
        h = flat + gate(self.cross_attn_attn_gate) * self.cross_attn(self.input_layernorm(flat), inputs)
        mlp = self.mlp(self.post_attention_layernorm(h)) * inputs.text_rows[:, None].astype(x.dtype)
        h = h + gate(self.cross_attn_mlp_gate) * mlp
        has_image = jnp.take(inputs.lengths, inputs.token_slots, mode="clip") > 0
        return jnp.where(has_image[:, None], h, flat).reshape(x.shape), cross

    def paged_inputs(self, pools: tuple, batch: PagedBatch, num_tokens: int) -> CrossInputs:
        """The `CrossInputs` of a paged step's tokens from their slots' pools and their positions."""
        if not isinstance(batch, PagedBatch):
            raise ValueError("Mllama's cross-attention pools are read by paged steps; dense batches take CrossInputs")
        k, v, lengths, segments = pools
        seq, positions, _ = token_layout(batch.meta, num_tokens)
        token_slots = jnp.take(batch.slots, seq, mode="clip")
        visible, text_rows = segment_visibility(segments, token_slots, positions, k.shape[1] // segments.shape[1])
        return CrossInputs(k, v, lengths, token_slots, visible, text_rows)


def token_visibility(cross_attention_mask: jax.Array | None, tile_tokens: int, num_rows: int,
                     num_features: int) -> tuple[jax.Array, jax.Array]:
    """(`visible [M, S]`, `text_rows [M]`) from the processor's `cross_attention_mask [B, L, I, T]` (None:
    every row sees every feature). A row that sees no tile sees them all (transformers' zero mask row) and
    loses its MLP branch."""
    if cross_attention_mask is None:
        return jnp.ones((num_rows, num_features), bool), jnp.ones((num_rows,), jnp.float32)
    mask = jnp.asarray(cross_attention_mask) > 0
    sees = jnp.repeat(mask.reshape(num_rows, -1), tile_tokens, axis=1)  # [M, I*T*P]
    any_tile = jnp.any(sees, axis=1)
    return jnp.where(any_tile[:, None], sees, True), any_tile.astype(jnp.float32)


def segment_visibility(segments: jax.Array, token_slots: jax.Array, positions: jax.Array,
                       segment_rows: int) -> tuple[jax.Array, jax.Array]:
    """(`visible [M, S]`, `text_rows [M]`) of query rows at `positions [M]` in slots `token_slots [M]`, from the
    slots' `segments [N, I, 3]` (each image's first and past-last seeing position and real rows; S = I *
    `segment_rows`), with `token_visibility`'s rule for a row that sees no image."""
    start, end, rows = jnp.moveaxis(jnp.take(segments, token_slots, axis=0, mode="clip"), -1, 0)  # [M, I] each
    p = positions[:, None]
    rows_seen = jnp.where((start <= p) & (p < end), rows, 0)
    sees = (jnp.arange(segment_rows)[None, None, :] < rows_seen[:, :, None]).reshape(rows_seen.shape[0], -1)
    any_row = jnp.any(rows_seen > 0, axis=1)
    return jnp.where(any_row[:, None], sees, True), any_row.astype(jnp.float32)


class MllamaForConditionalGeneration(CausalLM):
    """The Llama decoder with cross-attention layers, `vision_model` and `multi_modal_projector`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        mm = config.multimodal
        if not isinstance(mm, MllamaConfig):
            raise ValueError(f"{config.architecture} needs an Mllama vision configuration (MllamaConfig)")
        super().__init__(config, rngs=rngs)
        dtype = jnp.dtype(config.dtype)
        self.model.embed_tokens = Embed(config.vocab_size + EXTRA_TOKEN_ROWS, config.hidden_size,
                                        axes=("vocab", "embed"), dtype=dtype, init_std=config.initializer_range,
                                        rngs=rngs)
        for layer in mm.cross_attention_layers:
            self.model.layers[layer] = MllamaCrossAttentionDecoderLayer(config, layer, rngs=rngs)
        self.vision_model = MllamaVisionModel(mm.vision, dtype, rngs=rngs)
        self.multi_modal_projector = Linear(mm.vision.vision_output_dim, config.hidden_size, axes=(None, "embed"),
                                            use_bias=True, dtype=dtype, init_std=config.initializer_range, rngs=rngs)

    def image_features(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array,
                       aspect_ratio_mask: jax.Array) -> jax.Array:
        """The processor's `[B, I, T, C, H, W]` pixels, `aspect_ratio_ids [B, I]` and `aspect_ratio_mask
        [B, I, T]` -> projected features `[B, S, E]` (images, tiles, tokens in order)."""
        b, i, t = pixel_values.shape[:3]
        features = self.vision_model(pixel_values.reshape(b * i, *pixel_values.shape[2:]),
                                     aspect_ratio_ids.reshape(b * i), aspect_ratio_mask.reshape(b * i, t))
        return self.multi_modal_projector(features).reshape(b, -1, self.config.hidden_size)

    def fill_image_kv(self, pools: tuple, pixel_values: jax.Array, aspect_ratio_id: jax.Array,
                      aspect_ratio_mask: jax.Array, slot: jax.Array, index: jax.Array, length: jax.Array,
                      segments: jax.Array) -> tuple:
        """Serving: image `index` of the sequence in `slot`, its tiles `pixel_values [T, C, H, W]` with its
        aspect ratio id and mask `[T]` -> every cross-attention layer's keys and values in rows `[index R,
        (index + 1) R)` of the slot, whose length and `segments [I, 3]` are set too. `pools`: the cross layers'
        `CrossKV` pools in layer order."""
        t = pixel_values.shape[0]
        features = self.image_features(pixel_values[None, None], aspect_ratio_id.reshape(1, 1),
                                       aspect_ratio_mask.reshape(1, 1, t))[0]  # [R, E]
        filled, offset = [], index * features.shape[0]
        for layer, (k_pool, v_pool, lengths, slot_segments) in zip(self.config.multimodal.cross_attention_layers, pools):
            k, v = self.model.layers[layer].cross_attn.keys_values(features)
            k_pool, v_pool, lengths = write_cross(k_pool, v_pool, lengths, slot, k, v, length, offset)
            filled.append((k_pool, v_pool, lengths, slot_segments.at[slot].set(segments)))
        return tuple(filled)

    def cross_caches(self, features: jax.Array, lengths: jax.Array, visible: jax.Array, text_rows: jax.Array,
                     token_slots: jax.Array) -> list[CrossInputs | None]:
        """Every layer's entry of the `kv_caches` a dense batch runs with: each cross layer's `CrossInputs` over
        `features [N, S, E]` (the first `lengths [N]` rows of each), None for the self-attention layers."""
        caches: list[CrossInputs | None] = [None] * len(self.model.layers)
        for index in self.config.multimodal.cross_attention_layers:
            k, v = self.model.layers[index].cross_attn.keys_values(features)
            caches[index] = CrossInputs(k, v, lengths, token_slots, visible, text_rows, dense=True)
        return caches

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        aspect_ratio_ids: jax.Array | None = None,
        aspect_ratio_mask: jax.Array | None = None,
        cross_attention_mask: jax.Array | None = None,
        num_images: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits `[B, L, V]` (float32) with transformers' inputs: the processor's pixels, aspect ratio ids and
        masks and `cross_attention_mask`; without `pixel_values` the cross-attention layers are skipped.

        `num_images [B]`: each sequence's own images, its first ones (the trainer's batches); the rest of its
        image slots are batch padding that none of its tokens reads, so a sequence gives the logits it gives
        alone (0: no image, its cross-attention layers skipped). None: every slot is an image, as in
        transformers, whose rows that see no tile also read a batch's padding images."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        batch = dense_batch(input_ids, attention_mask, segment_ids, positions)
        caches = None
        if pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values need their aspect_ratio_ids and aspect_ratio_mask")
            features = self.image_features(jnp.asarray(pixel_values), jnp.asarray(aspect_ratio_ids),
                                           jnp.asarray(aspect_ratio_mask))
            b, length = input_ids.shape
            images = pixel_values.shape[1]
            if num_images is None:
                num_images = jnp.full((b,), images, jnp.int32)
            lengths = jnp.asarray(num_images, jnp.int32) * (features.shape[1] // images)
            visible, text_rows = token_visibility(cross_attention_mask, self.config.multimodal.vision.tile_tokens,
                                                  b * length, features.shape[1])
            token_slots = jnp.repeat(jnp.arange(b, dtype=jnp.int32), length)
            caches = self.cross_caches(features, lengths, visible, text_rows, token_slots)
        logits, _ = self.forward(input_ids, batch, caches)
        return logits
