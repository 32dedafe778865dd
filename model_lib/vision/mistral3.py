"""Mistral 3 (`Mistral3ForConditionalGeneration`): a Pixtral tower, a patch merger, and a Mistral decoder.

An image keeps its aspect ratio (the processor resizes it to multiples of `patch_size *
spatial_merge_size`); its tower grid of h x w patches is merged `spatial_merge_size`^2 at a time
into one feature row each. In the prompt the rows of the merged grid are `[IMG]` tokens, each
grid row closed by `[IMG_BREAK]` and the last by `[IMG_END]` (those two keep their own embeddings).

Glossary: m merge size, h x w tower patches, E text width, D vision width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import Linear, RMSNorm
from model_lib.layers.activations import activation
from model_lib.vision.config import MultiModalConfig
from model_lib.vision.pixtral import PixtralVisionTower
from model_lib.vision.vlm import VisionLanguageModel

MAX_MERGE = 8  # a bound on spatial_merge_size


@dataclass(frozen=True)
class Mistral3Config(MultiModalConfig):
    """LLaVA's fields plus the merge size, the row-break and end tokens (from the tokenizer), and the projector
    norm's epsilon."""

    spatial_merge_size: int = 2
    break_token_id: int | None = None
    end_token_id: int | None = None
    projector_norm_eps: float = 1e-5
    prompt_tokens = {"break_token_id": "[IMG_BREAK]", "end_token_id": "[IMG_END]"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.spatial_merge_size <= MAX_MERGE:
            raise ValueError(f"spatial_merge_size must be in [1, {MAX_MERGE}], got {self.spatial_merge_size}")

    @property
    def unit(self) -> int:
        """Pixels along one side of one merged feature row."""
        return self.vision.patch_size * self.spatial_merge_size

    def grid(self, pixels: Any) -> tuple[int, int]:
        """(rows, columns) of merged features for an image's pixels `[C, H, W]`."""
        height, width = pixels.shape[-2:]
        if height % self.unit or width % self.unit or max(height, width) > self.vision.image_size:
            raise ValueError(f"Pixtral pixels must be multiples of {self.unit} and at most {self.vision.image_size} "
                             f"per side, got {height}x{width}")
        return height // self.unit, width // self.unit

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        if self.break_token_id is None or self.end_token_id is None:
            raise ValueError("the [IMG_BREAK] / [IMG_END] token ids are unknown (with_tokenizer was not called)")
        rows, cols = self.grid(pixels)
        ids = ([self.image_token_id] * cols + [self.break_token_id]) * rows
        return ids[:-1] + [self.end_token_id]

    def own_size_grid(self, pixels: Any) -> tuple[int, int]:
        """Training batches (`training/data.py`): images keep their own size, padded to the run's largest, and
        an image's feature rows are this grid of the padded one (`encode_padded`)."""
        return self.grid(pixels)

    @property
    def max_image_tokens(self) -> int:
        side = self.vision.image_size // self.unit
        return side * (side + 1)


class Mistral3PatchMerger(nnx.Module):
    """Each m x m block of the tower grid -> one row (`merging_layer` over the block's features, channel-major
    as torch's `unfold` orders them)."""

    def __init__(self, mm: Mistral3Config, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.m = mm.spatial_merge_size
        d = mm.vision.hidden_size
        self.merging_layer = Linear(d * self.m**2, d, axes=(None, None), use_bias=False, dtype=dtype, init_std=0.02,
                                    rngs=rngs)

    def __call__(self, features: jax.Array, h: int, w: int) -> jax.Array:
        """`[h * w, D]` -> `[(h / m) * (w / m), D]`."""
        m, d = self.m, features.shape[-1]
        blocks = features.reshape(h // m, m, w // m, m, d).transpose(0, 2, 4, 1, 3)  # [h/m, w/m, D, m, m]
        return self.merging_layer(blocks.reshape(-1, d * m * m))


class Mistral3MultiModalProjector(nnx.Module):
    """`linear_2(act(linear_1(merge(norm(features)))))`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        mm: Mistral3Config = config.multimodal
        dtype = jnp.dtype(config.dtype)
        d, e = mm.vision.hidden_size, config.hidden_size
        self.norm = RMSNorm((d,), eps=mm.projector_norm_eps, weight_offset=0.0, dtype=dtype)
        self.patch_merger = Mistral3PatchMerger(mm, dtype, rngs=rngs)
        common = dict(use_bias=mm.projector_bias, dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.act = activation(mm.projector_activation)
        self.linear_1 = Linear(d * len(mm.feature_layers), e, axes=(None, "embed"), **common)
        self.linear_2 = Linear(e, e, axes=("embed", None), **common)

    def __call__(self, features: jax.Array, h: int, w: int) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(features), h, w))))


class Mistral3ForConditionalGeneration(VisionLanguageModel):
    """`pixel_values`: one `[C, H, W]` array per image (the processor's for that image alone, unpadded)."""

    mm_class, tower_class, projector_class = Mistral3Config, PixtralVisionTower, Mistral3MultiModalProjector

    @staticmethod
    def encode(mm: Mistral3Config, modules: tuple, pixels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """`[C, H, W]` -> `[(H / Pm) * (W / Pm), E]`; `valid [h * w]`: the patches that attend (`encode_padded`)."""
        tower, projector = modules
        states = tower.hidden_states(pixels[None], mm.deepest_layer, None if valid is None else valid[None])
        selected = jnp.concatenate([states[layer % (mm.vision.num_layers + 1)] for layer in mm.feature_layers], -1)
        p = mm.vision.patch_size
        return projector(selected[0], pixels.shape[-2] // p, pixels.shape[-1] // p)

    @staticmethod
    def encode_padded(mm: Mistral3Config, modules: tuple, pixels: jax.Array, size: jax.Array) -> jax.Array:
        """Training's pixels `[C, H, W]` holding an image of `size` (its height, width) at the top left, zeros
        around -> the merged grid's rows `[(H / Pm) * (W / Pm), E]`: the image's rows at their places in it, as
        `encode` gives them for the image alone (its patches attend only to each other), padding rows elsewhere."""
        p = mm.vision.patch_size
        rows, cols = jnp.meshgrid(jnp.arange(pixels.shape[-2] // p), jnp.arange(pixels.shape[-1] // p), indexing="ij")
        valid = (rows < size[0] // p) & (cols < size[1] // p)
        return Mistral3ForConditionalGeneration.encode(mm, modules, pixels, valid.reshape(-1))
