"""Qwen-VL images in serving: grid-sized placeholder runs, the per-image tower call, M-RoPE step positions.

A Qwen3-VL image's feature rows hold its DeepStack sets beside its embeddings (`[U, (1 + K) F]`);
the encoder lays them out for the step like any rows and splits them (`MergedEmbeddings.from_sets`).

The image processor (`Qwen2VLImageProcessorPil`) resizes each image to a multiple of the merged
patch and returns its patch rows and grid `(t, h, w)`; the image then takes `t * h * w / m^2`
placeholders, so the number varies per image (the single placeholder that the chat template
writes is expanded here, as transformers' processor does in the text). The item keeps its rows
shaped `[t, h, w, C*Tp*P*P]`, so the grid travels with the pixels and into the item's hash.

The tower is compiled per patch count (images of one size share a compilation); there is no
start-up warm-up for it since the sizes are the clients'.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.vision.qwen_vit import vision_layout
from model_lib.vision.qwen_vl import QwenVLConfig, image_features
from serving.multimodal.encoder import ImageEncoder
from serving.multimodal.images import to_rgb
from serving.multimodal.inputs import ImageInputs, ImageItem


class QwenImageInputs(ImageInputs):
    """`ImageInputs` whose images take as many placeholders as their merged grid has cells."""

    config: QwenVLConfig

    def preprocess(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        image = to_rgb(image)
        out = self.processor(images=[image], return_tensors="np")
        (grid,) = np.asarray(out["image_grid_thw"]).tolist()
        rows = np.asarray(out["pixel_values"], np.float32)
        vision = self.config.vision
        if rows.shape[-1] != vision.patch_features:
            raise ValueError(f"the image processor makes patches of {rows.shape[-1]} values; the vision tower "
                             f"takes {vision.patch_features} (patch_size / temporal_patch_size differ)")
        if grid[1] % self.config.merge or grid[2] % self.config.merge:
            raise ValueError(f"the image processor's grid {grid} does not split into "
                             f"{self.config.merge}x{self.config.merge} merge blocks (merge_size differs)")
        return rows.reshape(*grid, -1), (image.height, image.width)


def _encode(graphdef, state, patches, layout):
    return image_features(nnx.merge(graphdef, state), patches, layout)


class QwenImageEncoder(ImageEncoder):
    """Runs the Qwen ViT on one image at a time (one compilation per patch count)."""

    def __init__(self, model: nnx.Module, budget: int):
        self.config = model.config.multimodal
        self.budget = budget
        self.hidden_size = model.config.hidden_size
        self.feature_sets = self.config.vision.feature_sets  # Qwen3-VL: 1 + its DeepStack sets
        self.dtype = jnp.dtype(model.config.dtype)
        self.graphdef, self.state = nnx.split(model.visual)
        self._encode = jax.jit(_encode, static_argnums=0)
        self.num_encoded = 0

    def encode(self, item: ImageItem) -> None:
        grid = item.pixel_values.shape[:3]
        layout = vision_layout(self.config.vision, grid)
        patches = jnp.asarray(item.pixel_values.reshape(-1, item.pixel_values.shape[-1]))
        item.features = np.asarray(self._encode(self.graphdef, self.state, patches, layout))
        self.num_encoded += 1

    def warm_up(self, runner: Any) -> None:
        """Nothing to compile ahead: the patch counts are the images'."""
