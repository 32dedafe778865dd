"""Llama 4's image path (`Llama4ForConditionalGeneration`): tiles, a ViT with 2D rotary, a pixel-shuffle
adapter and one projection into the Llama 4 text model.

What transformers' `modeling_llama4.py` makes the vision keys mean:
- the processor cuts an image into a grid of `rh x rw` square tiles of the tower's `image_size` (the
  canvas picked by `tile_grid`), plus a global view of the whole image when there is more than one;
- `Llama4VisionModel`: each tile's `P x P` patches, unfolded channel-major, through `patch_embedding.linear`
  (no bias); `class_embedding` appended LAST; `positional_embedding_vlm` added; `layernorm_pre`; pre-norm
  encoder layers (LayerNorm eps 1e-5, biased q/k/v/o, exact GELU MLP) whose q and k turn by a 2D rotary
  in Meta's complex form (pairs of adjacent features; the first half of the pairs by the patch's column + 1,
  the second by its row + 1, the class token not at all); `layernorm_post`; the class token dropped;
- `vision_adapter`: pixel shuffle by `pixel_shuffle_ratio` (2x2 neighbours folded into channels at 0.5),
  then `gelu(fc2(gelu(fc1(x))))` without biases (`fc1` takes `intermediate_size` features, so that must be
  `hidden_size / ratio^2`); `multi_modal_projector.linear_1` (no bias) into the text width.
In the prompt an image is `<|image_start|>`, per tile row the tiles' `<|patch|>` runs separated by
`<|tile_x_separator|>` and closed by `<|tile_y_separator|>` (multi-tile images only), then `<|image|>` and
the global view's (or the only tile's) `<|patch|>` run, then `<|image_end|>`. `<|patch|>` is
`image_token_index`; the other tokens keep their embeddings and their ids come from the tokenizer.

Glossary: N tiles, P patch side, s x s patches per tile, S = s^2 + 1 tokens, r = 1 / pixel_shuffle_ratio,
D vision width, E text width, H head width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import LayerNorm, Linear
from model_lib.layers.activations import activation
from model_lib.layers.rotary import apply_rotary
from model_lib.vision.clip import attend
from model_lib.vision.config import MultiModalConfig, VisionConfig
from model_lib.vision.internvl import pixel_shuffle
from model_lib.vision.vlm import VisionLanguageModel

NORM_EPS = 1e-5  # transformers builds every Llama 4 vision LayerNorm with torch's default
MAX_TILES = 64  # a bound on the processor's max_patches (Llama 4 ships 16)


@dataclass(frozen=True)
class Llama4VisionConfig(VisionConfig):
    """The tower's settings plus the adapter's: shuffle factor `r` and the projector widths."""

    shuffle: int = 2
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        side = self.image_size // self.patch_size
        if side % self.shuffle:
            raise ValueError(f"{side}x{side} patches per tile do not shuffle by 1 / pixel_shuffle_ratio "
                             f"({self.shuffle})")
        shuffled = self.hidden_size * self.shuffle**2
        if self.intermediate_size != shuffled:
            raise ValueError(f"the vision adapter's fc1 takes intermediate_size ({self.intermediate_size}) features, "
                             f"and pixel shuffle gives hidden_size * {self.shuffle ** 2} ({shuffled})")
        if self.projector_input_dim != self.projector_output_dim:
            raise ValueError(f"projector_input_dim ({self.projector_input_dim}) must equal projector_output_dim "
                             f"({self.projector_output_dim}): the adapter's fc2 takes fc1's output")
        if (self.head_dim // 2) % 2:
            raise ValueError(f"the vision head width ({self.head_dim}) must be a multiple of 4 (2D rotary)")

    @property
    def tile_rows(self) -> int:
        """Feature rows per tile."""
        return self.num_patches // self.shuffle**2


def tile_grid(image_size: tuple[int, int], tile: int, max_tiles: int, to_max_canvas: bool = False) -> tuple[int, int]:
    """(rows, columns) of tiles the Llama 4 processor cuts an image of (height, width) into: of the canvases of
    at most `max_tiles` tiles, the one needing the least upscaling (the most with `to_max_canvas`), or if none
    fits the least downscaling, without distortion; the smallest such canvas on ties. As transformers'
    `find_supported_resolutions` / `get_best_fit`: canvases grouped by aspect ratio in its order, float32 scales."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in sorted({d for d in range(1, count + 1) if count % d == 0}):
            by_ratio.setdefault(rows / (count // rows), []).append((rows, count // rows))
    canvases = [canvas for group in by_ratio.values() for canvas in group]
    height, width = np.float32(image_size[0]), np.float32(image_size[1])
    scales = [min(np.float32(c * tile) / width, np.float32(r * tile) / height) for r, c in canvases]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if to_max_canvas else min(up)) if up else max(scales)
    candidates = [canvas for canvas, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda rc: rc[0] * rc[1])  # the first of the smallest area, as torch.argmin


@dataclass(frozen=True)
class Llama4MultiModalConfig(MultiModalConfig):
    """The vision config, `image_token_id` (`<|patch|>`), the tiling of the checkpoint's processor
    (`with_processor`) and the ids of the image-run tokens (`with_tokenizer`)."""

    tile_size: int | None = None
    max_tiles: int | None = None
    to_max_canvas: bool = False
    marker_token_id: int | None = None
    start_token_id: int | None = None
    end_token_id: int | None = None
    tile_x_token_id: int | None = None
    tile_y_token_id: int | None = None
    prompt_tokens = {"marker_token_id": "<|image|>", "start_token_id": "<|image_start|>",
                     "end_token_id": "<|image_end|>", "tile_x_token_id": "<|tile_x_separator|>",
                     "tile_y_token_id": "<|tile_y_separator|>"}

    def with_processor(self, processor: Any) -> "Llama4MultiModalConfig":
        tile = processor.size["height"]
        if processor.size["width"] != tile or tile != self.vision.image_size:
            raise ValueError(f"Llama 4 tiles must be square at the tower's image_size ({self.vision.image_size}), "
                             f"the processor's size is {dict(processor.size)}")
        if not 0 < processor.max_patches <= MAX_TILES:
            raise ValueError(f"max_patches must be in [1, {MAX_TILES}], got {processor.max_patches}")
        return dataclasses.replace(self, tile_size=tile, max_tiles=processor.max_patches,
                                   to_max_canvas=bool(processor.resize_to_max_canvas))

    @property
    def prompt_token_id(self) -> int:
        if self.marker_token_id is None:
            raise ValueError("the <|image|> token id is unknown (with_tokenizer was not called)")
        return self.marker_token_id

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (1, *super().pixel_shape)

    @property
    def max_image_tokens(self) -> int:
        rows, tiles = self.vision.tile_rows, self.max_tiles or MAX_TILES
        return (rows + 1) * tiles + rows + 3  # tiles and their separators, the global view, 3 marks

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        if None in (self.start_token_id, self.end_token_id, self.tile_x_token_id, self.tile_y_token_id):
            raise ValueError("the Llama 4 image tokens are unknown (with_tokenizer was not called)")
        if self.max_tiles is None:
            raise ValueError("the Llama 4 tiling is unknown (with_processor was not called)")
        rows, cols = tile_grid(image_size, self.tile_size, self.max_tiles, self.to_max_canvas)
        expected = 1 if rows * cols == 1 else rows * cols + 1
        if len(pixels) != expected:
            raise ValueError(f"a {image_size[0]}x{image_size[1]} image takes {expected} Llama 4 tiles, "
                             f"got {len(pixels)}")
        patches = [self.image_token_id] * self.vision.tile_rows
        ids = [self.start_token_id]
        if rows * cols > 1:
            row = (patches + [self.tile_x_token_id]) * cols
            ids += (row[:-1] + [self.tile_y_token_id]) * rows
        return ids + [self.marker_token_id] + patches + [self.end_token_id]


def _linear(in_features: int, out_features: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(in_features, out_features, axes=(None, None), use_bias=bias, dtype=dtype, init_std=0.02, rngs=rngs)


def _norm(config: Llama4VisionConfig, dtype: jnp.dtype) -> LayerNorm:
    return LayerNorm((config.hidden_size,), eps=NORM_EPS, use_bias=True, weight_offset=0.0, dtype=dtype)


def vision_rope(config: Llama4VisionConfig) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) `[S, H / 2]` for the tile's patches row-major, then the class token (angle 0)."""
    side = config.image_size // config.patch_size
    freq_dim = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, freq_dim, 2, dtype=jnp.float32)[: freq_dim // 2] / freq_dim)
    index = jnp.arange(side * side)
    cols, rows = (index % side + 1).astype(jnp.float32), (index // side + 1).astype(jnp.float32)
    angles = jnp.concatenate([cols[:, None] * inv_freq, rows[:, None] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, jnp.zeros((1, freq_dim), jnp.float32)])
    return jnp.cos(angles), jnp.sin(angles)


class Llama4UnfoldConvolution(nnx.Module):
    """Non-overlapping patches, flattened channel-major (torch's `Unfold`), through `linear`."""

    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        self.linear = _linear(config.num_channels * config.patch_size**2, config.hidden_size, False, dtype, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`[N, C, H, W]` -> `[N, (H / P) * (W / P), D]`."""
        n, c, h, w = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)  # [N, h, w, C, P, P]
        return self.linear(patches.reshape(n, (h // p) * (w // p), c * p * p))


class Llama4VisionAttention(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(d, d, True, dtype, rngs) for _ in range(4))

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        n, s, d = x.shape
        q, k, v = (proj(x).reshape(n, s, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = (apply_rotary(t.astype(jnp.float32), *rope, interleaved=True).astype(t.dtype) for t in (q, k))
        return self.o_proj(attend(q, k, v).reshape(n, s, d))


class Llama4VisionMLP(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation("gelu")  # transformers ignores hidden_act here
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, True, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, True, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Llama4VisionEncoderLayer(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.input_layernorm = _norm(config, dtype)
        self.self_attn = Llama4VisionAttention(config, dtype, rngs=rngs)
        self.post_attention_layernorm = _norm(config, dtype)
        self.mlp = Llama4VisionMLP(config, dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4VisionEncoder(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Llama4VisionEncoderLayer(config, dtype, rngs=rngs) for _ in range(config.num_layers)])


class Llama4VisionMLP2(nnx.Module):
    """The adapter's MLP: GELU after both layers, no biases."""

    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation("gelu")
        self.fc1 = _linear(config.intermediate_size, config.projector_input_dim, False, dtype, rngs)
        self.fc2 = _linear(config.projector_output_dim, config.projector_output_dim, False, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.fc2(self.act(self.fc1(x))))


class Llama4VisionPixelShuffleMLP(nnx.Module):
    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.shuffle = config.shuffle
        self.mlp = Llama4VisionMLP2(config, dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[N, s^2, D]` -> `[N, s^2 / r^2, projector_output_dim]`."""
        n, s2, d = x.shape
        side = round(s2**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, d), self.shuffle)
        return self.mlp(x.reshape(n, -1, x.shape[-1]))


class Llama4VisionModel(nnx.Module):
    """Tiles `[N, C, H, W]` (H = W = image_size) -> the adapter's rows `[N, tile_rows, projector_output_dim]`."""

    def __init__(self, config: Llama4VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        init = jax.nn.initializers.normal(d**-0.5)
        self.patch_embedding = Llama4UnfoldConvolution(config, dtype, rngs=rngs)
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), dtype))
        self.positional_embedding_vlm = nnx.Param(init(rngs.params(), (config.num_patches + 1, d), dtype))
        self.layernorm_pre = _norm(config, dtype)
        self.layernorm_post = _norm(config, dtype)
        self.model = Llama4VisionEncoder(config, dtype, rngs=rngs)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config, dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        v = self.config
        if pixel_values.shape[-2:] != (v.image_size, v.image_size):
            raise ValueError(f"Llama 4 tiles are {v.image_size}x{v.image_size}, got {pixel_values.shape[-2:]}")
        x = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([x, cls], axis=1) + self.positional_embedding_vlm[...].astype(x.dtype)
        x = self.layernorm_pre(x)
        rope = vision_rope(v)
        for layer in self.model.layers:
            x = layer(x, rope)
        return self.vision_adapter(self.layernorm_post(x)[:, :-1])


class Llama4MultiModalProjector(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        vision: Llama4VisionConfig = config.multimodal.vision
        self.linear_1 = Linear(vision.projector_output_dim, config.hidden_size, axes=(None, "embed"), use_bias=False,
                               dtype=jnp.dtype(config.dtype), init_std=config.initializer_range, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(VisionLanguageModel):
    """`pixel_values`: one `[N, C, H, W]` array of tiles per image (its grid's tiles row-major, then the global
    view when there is more than one)."""

    vision_parts = ("vision_model", "multi_modal_projector")
    mm_class, tower_class, projector_class = Llama4MultiModalConfig, Llama4VisionModel, Llama4MultiModalProjector

    @staticmethod
    def encode(mm: Llama4MultiModalConfig, modules: tuple, pixels: jax.Array) -> jax.Array:
        """`[N, C, H, W]` tiles -> `[N * tile_rows, E]`."""
        tower, projector = modules
        rows = tower(pixels)
        return projector(rows.reshape(-1, rows.shape[-1]))
