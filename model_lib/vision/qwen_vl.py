"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4.1V: a ViT whose merged patches replace image placeholders, M-RoPE
positions.

`QwenVLForConditionalGeneration` is a `CausalLM` (its `model` is the language model, Qwen's or
GLM-4's, so the engine, LoRA and the trainer see the decoder they know) that also holds `visual`
(the Qwen ViT, or GLM-4.1V's `model_lib/vision/glm4v_vit.py`, chosen by the vision config's type).
Each image fills `t * h * w / m^2` consecutive `image_token_id` placeholders; the prompt's
positions are three-dimensional (`model_lib/vision/mrope.py`; for images Qwen3-VL's and GLM-4.1V's
`get_rope_index` give the same positions as Qwen2-VL's, and Qwen3-VL's rotary interleaves the axes:
`RopeConfig.mrope_interleaved`). Qwen3-VL's DeepStack feature sets ride in
`MergedEmbeddings.deepstack`; the decoder adds them after its first K layers.

Glossary: N patches of an image, U its merged rows (placeholder tokens), F text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.decoder import CausalLM
from model_lib.vision.config import ImagePlaceholders
from model_lib.vision.merge import MergedEmbeddings, placeholder_index
from model_lib.vision.mrope import ImageSpan, mrope_positions
from model_lib.vision.glm4v_vit import GlmVisionConfig, GlmVisionTower
from model_lib.vision.qwen_vit import QwenVisionConfig, QwenVisionTower, VisionLayout, vision_layout

VISION_TOWERS = {QwenVisionConfig: QwenVisionTower, GlmVisionConfig: GlmVisionTower}  # vision config type -> tower


@dataclass(frozen=True)
class QwenVLConfig(ImagePlaceholders):
    """How Qwen-VL image features reach the language model: placeholders, and the grid's merge size."""

    vision: QwenVisionConfig
    image_token_id: int

    @property
    def merge(self) -> int:
        return self.vision.spatial_merge_size

    @property
    def deepstack_layers(self) -> int:
        """Decoder layers whose outputs take a DeepStack feature set at the image tokens (Qwen3-VL)."""
        return len(self.vision.deepstack_indexes)

    def merged_grid(self, grid: Sequence[int]) -> tuple[int, int, int]:
        """A processor grid (t, h, w) in patches -> in placeholder tokens (t, h / m, w / m)."""
        t, h, w = (int(x) for x in grid)
        return t, h // self.merge, w // self.merge

    def image_tokens_for(self, grid: Sequence[int]) -> int:
        """Placeholder tokens (and feature rows) of an image of `grid` patches."""
        t, h, w = self.merged_grid(grid)
        return t * h * w

    def placeholder_ids(self, pixels: np.ndarray, image_size: tuple[int, int]) -> list[int]:
        """`pixels`: the image's patch rows by grid, `[t, h, w, C*Tp*P*P]`."""
        return [self.image_token_id] * self.image_tokens_for(pixels.shape[:3])


def image_features(tower: QwenVisionTower | GlmVisionTower, patches: jax.Array, layout: VisionLayout) -> jax.Array:
    """One image's patches `[N, C*Tp*P*P]` -> features `[U, (1 + K) F]` (a function of the tower alone, for
    servers; K DeepStack sets after the embeddings, `MergedEmbeddings.from_sets`)."""
    return tower.features(patches, layout)


def prompt_positions(ids: np.ndarray, config: QwenVLConfig, grids: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """M-RoPE positions `[3, T]` and delta of one prompt whose placeholder runs take `grids` in order."""
    spans, cursor = [], 0
    ids = np.asarray(ids)
    for grid in grids:
        starts = np.flatnonzero(ids[cursor:] == config.image_token_id)
        if not len(starts):
            raise ValueError(f"{len(grids)} image grids but fewer placeholder runs in the prompt")
        span = ImageSpan(cursor + int(starts[0]), config.merged_grid(grid))
        spans.append(span)
        cursor = span.offset + span.length
    positions = mrope_positions(len(ids), spans)
    return positions.prompt, positions.delta


class QwenVLForConditionalGeneration(CausalLM):
    """A decoder with M-RoPE whose image placeholder tokens take merged ViT features."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config.multimodal, QwenVLConfig):
            raise ValueError(f"{config.architecture} needs a Qwen-VL vision configuration (ModelConfig.multimodal)")
        super().__init__(config, rngs=rngs)
        vision = config.multimodal.vision
        self.visual = VISION_TOWERS[type(vision)](vision, jnp.dtype(config.dtype), rngs=rngs)

    @property
    def unrolled_layers(self) -> int:
        """Layers a serving view must not scan: DeepStack adds to their outputs (`layer_scan.scanned_view`)."""
        return self.config.multimodal.deepstack_layers

    def image_features(self, patches: jax.Array, grid: Sequence[int]) -> jax.Array:
        """One image's processor patches `[N, C*Tp*P*P]` and grid (t, h, w) -> `[U, (1 + K) F]`."""
        layout = vision_layout(self.config.multimodal.vision, tuple(int(x) for x in grid))
        return _compiled_features(self.visual, jnp.asarray(patches), jax.tree.map(jnp.asarray, layout))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        image_grid_thw: Sequence[Sequence[int]] | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        merged: MergedEmbeddings | None = None,
        rope_positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for a `[B, T]` batch (right padded or unpadded) whose placeholder runs take the images of
        `pixel_values` (the processor's rows of all images, concatenated) with `image_grid_thw`, in order.
        M-RoPE positions follow transformers' `get_rope_index` unless `rope_positions [3, B, T]` is given
        (without images: the 1D positions on all three axes, as transformers' text-only forward)."""
        mm: QwenVLConfig = self.config.multimodal
        grids = [tuple(int(x) for x in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
        if pixel_values is None and not grids:  # the text path (traceable: no host work)
            return super().__call__(input_ids, attention_mask, segment_ids=segment_ids, positions=positions,
                                    merged=merged, rope_positions=rope_positions)
        ids = np.asarray(input_ids, np.int32)
        if pixel_values is not None:
            if merged is not None:
                raise ValueError("pass pixel_values or merged features, not both")
            patches, rows = np.asarray(pixel_values), []
            sizes = np.cumsum([0] + [int(np.prod(g)) for g in grids])
            if sizes[-1] != patches.shape[0]:
                raise ValueError(f"image_grid_thw covers {sizes[-1]} patches; pixel_values has {patches.shape[0]}")
            rows = [self.image_features(patches[a:b], g) for a, b, g in zip(sizes[:-1], sizes[1:], grids)]
            features = jnp.concatenate(rows, axis=0)
            merged = MergedEmbeddings.from_sets(features, placeholder_index(jnp.asarray(ids), mm.image_token_id),
                                                self.config.hidden_size)
        if rope_positions is None:
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            rope_positions = np.zeros((3, *ids.shape), np.int32)
            remaining = iter(grids)
            for b in range(ids.shape[0]):
                real = mask[b].astype(bool)
                runs = _count_runs(ids[b][real], mm.image_token_id)
                row_grids = [next(remaining) for _ in range(runs)]
                rope_positions[:, b, real] = prompt_positions(ids[b][real], mm, row_grids)[0]
        return _compiled_decoder(self, jnp.asarray(input_ids), attention_mask, segment_ids=segment_ids,
                                 positions=positions, merged=merged, rope_positions=jnp.asarray(rope_positions))


# The image path does host work on the ids and grids, so it runs eagerly; its tower and decoder calls are
# compiled whole (op by op, a tiny model's first call with new shapes takes tens of seconds on a CPU).
_compiled_features = nnx.jit(image_features)
_compiled_decoder = nnx.jit(CausalLM.__call__)


def _count_runs(ids: np.ndarray, token: int) -> int:
    hits = ids == token
    return int(np.sum(hits[1:] & ~hits[:-1]) + (hits[0] if len(hits) else 0))
