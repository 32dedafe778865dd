"""LLaVA-NeXT and LLaVA-OneVision: LLaVA with any-resolution tiling (`model_lib/vision/anyres.py`).

One image's pixels are `[N, C, H, W]`: the base view, then the grid's tiles row-major (OneVision
passes the base view alone for an image that shares its prompt with others). Each tile goes
through the tower and projector as a LLaVA image; `pack` lays the tiles out, unpads, and adds
`image_newline` (a learned `[E]` row, `image_newline` in every checkpoint layout). OneVision
is the same module with a SigLIP tower and `anyres_max` set (its config's `vision_aspect_ratio`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.vision.anyres import AnyResConfig, gather_packed, pack, pool_frames
from model_lib.vision.llava import LlavaForConditionalGeneration, image_features
from model_lib.vision.vlm import LearnedRow, VisionLanguageModel


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """`pixel_values`: one `[N, C, H, W]` array per image (the processor's, padding tiles allowed; OneVision's
    images of a several-image prompt: their base view `[:1]`); `image_sizes`: each original (height, width)."""

    vision_parts = ("vision_tower", "multi_modal_projector", "image_newline")
    __call__ = VisionLanguageModel.__call__

    mm_class = AnyResConfig

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.image_newline = LearnedRow(config.hidden_size, jnp.dtype(config.dtype), rngs=rngs)

    @staticmethod
    def encode(mm: AnyResConfig, modules: tuple, pixels: jax.Array) -> jax.Array:
        """`[N, C, H, W]` tiles -> `[N, S, E]`."""
        tower, projector, _ = modules
        return image_features(mm, tower, projector, pixels)

    @staticmethod
    def arrange(mm: AnyResConfig, modules: tuple, encoded: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        return pack(mm, encoded, modules[2].weight[...], image_size)

    @staticmethod
    def arrange_by_layout(mm: AnyResConfig, modules: tuple, encoded: jax.Array, sources: jax.Array,
                          weights: jax.Array) -> jax.Array:
        """`arrange` by the host-side layout `mm.layout` gives (training: images of any size in one step)."""
        return gather_packed(encoded, modules[2].weight[...], sources, weights)

    def image_rows(self, pixels: Any, image_size: tuple[int, int]) -> jax.Array:
        rows, cols = self.config.multimodal.grid(image_size)
        return super().image_rows(pixels[: 1 + rows * cols], image_size)


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT's module with videos; the config carries OneVision's other differences (SigLIP tower,
    `anyres_max`)."""

    @staticmethod
    def encode_video(mm: AnyResConfig, modules: tuple, frames: jax.Array) -> jax.Array:
        tower, projector, newline = modules
        return pool_frames(mm, image_features(mm, tower, projector, frames), newline.weight[...])
