"""InternVL (`InternVLForConditionalGeneration`): InternViT tiles, pixel shuffle, an MLP projector.

The processor cuts an image into square tiles (plus a thumbnail) of the tower's size; each
tile's patch grid (CLS dropped by the "default" strategy) is pixel-shuffled by
`downsample_ratio` (2x2 neighbours folded into the channels at 0.5) and projected by
`linear_2(act(linear_1(layer_norm(x))))`. In the prompt an image is `<img>`, one
`<IMG_CONTEXT>` per feature row of every tile, `</img>`; `<img>` / `</img>` keep their own
embeddings and their ids come from the tokenizer.

Glossary: N tiles, s x s patches per tile, r = 1 / downsample_ratio, D vision width, E text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import LayerNorm, Linear
from model_lib.layers.activations import activation
from model_lib.vision.config import MultiModalConfig
from model_lib.vision.internvit import InternVisionTower
from model_lib.vision.vlm import VisionLanguageModel

MAX_TILES = 64  # a bound on the tiles of one image (InternVL's processors default to 12 and a thumbnail)


@dataclass(frozen=True)
class InternVLConfig(MultiModalConfig):
    """LLaVA's fields plus the shuffle factor `r` (1 / downsample_ratio) and the `<img>` / `</img>` ids."""

    shuffle: int = 2
    start_token_id: int | None = None
    end_token_id: int | None = None
    prompt_tokens = {"start_token_id": "<img>", "end_token_id": "</img>"}

    def __post_init__(self) -> None:
        super().__post_init__()
        side = round(self.image_tokens**0.5)
        if side * side != self.image_tokens or side % self.shuffle:
            raise ValueError(f"InternVL needs a square patch grid divisible by 1 / downsample_ratio ({self.shuffle}); "
                             f"got {self.image_tokens} feature tokens per tile")

    @property
    def tile_rows(self) -> int:
        """Feature rows per tile."""
        return self.image_tokens // self.shuffle**2

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        if self.start_token_id is None or self.end_token_id is None:
            raise ValueError("the <img> / </img> token ids are unknown (with_tokenizer was not called)")
        if not 0 < len(pixels) <= MAX_TILES:
            raise ValueError(f"an InternVL image has 1 to {MAX_TILES} tiles, got {len(pixels)}")
        return [self.start_token_id] + [self.image_token_id] * (self.tile_rows * len(pixels)) + [self.end_token_id]

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (1, *super().pixel_shape)

    @property
    def max_image_tokens(self) -> int:
        return self.tile_rows * MAX_TILES + 2


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """`[N, s, s, D]` -> `[N, s / r, s / r, D * r^2]` in transformers' order (its two views and transposes)."""
    n, a, b, d = x.shape
    x = x.reshape(n, a, b // r, d * r).transpose(0, 2, 1, 3)
    return x.reshape(n, b // r, a // r, d * r * r).transpose(0, 2, 1, 3)


class InternVLMultiModalProjector(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        mm: InternVLConfig = config.multimodal
        dtype = jnp.dtype(config.dtype)
        width = mm.vision.hidden_size * mm.shuffle**2
        self.layer_norm = LayerNorm((width,), eps=1e-5, use_bias=True, weight_offset=0.0, dtype=dtype)
        common = dict(use_bias=True, dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.act = activation(mm.projector_activation)
        self.linear_1 = Linear(width, config.hidden_size, axes=(None, "embed"), **common)
        self.linear_2 = Linear(config.hidden_size, config.hidden_size, axes=("embed", None), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLForConditionalGeneration(VisionLanguageModel):
    """`pixel_values`: one `[N, C, H, W]` array of tiles per image."""

    mm_class, tower_class, projector_class = InternVLConfig, InternVisionTower, InternVLMultiModalProjector

    @staticmethod
    def encode(mm: InternVLConfig, modules: tuple, pixels: jax.Array) -> jax.Array:
        """`[N, C, H, W]` tiles -> `[N * rows per tile, E]`."""
        tower, projector = modules
        (layer,) = mm.feature_layers
        if layer == -1:
            x = tower.last_hidden_state(pixels)
        else:
            x = tower.hidden_states(pixels, mm.deepest_layer)[layer % (mm.vision.num_layers + 1)]
        if mm.feature_strategy == "default":
            x = x[:, 1:]
        n, s2, d = x.shape
        side = round(s2**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, d), mm.shuffle)
        return projector(x.reshape(-1, x.shape[-1]))
