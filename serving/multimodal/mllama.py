"""Mllama (Llama 3.2 Vision) images in serving: read by cross attention, not merged into the embeddings.

A prompt marks each image with one `<|image|>` token, which keeps its own embedding (consecutive tokens are
consecutive images, not a placeholder run). The image processor (`MllamaImageProcessorPil`) resizes an image
onto a grid of tiles; the item keeps its real tiles shaped `[a, b, C, H, W]` by that grid (the processor's
`supported_aspect_ratios[aspect_ratio_id - 1]`), so the grid travels with the pixels and into the hash.

When a sequence takes its slot (its first step, and again after a preemption, which recomputes it), `fill`
runs the vision model on each of its images (padded to `max_num_tiles` with zero tiles, as the processor
does) and writes every cross-attention layer's keys and values into the slot's `CrossKV` rows, image i in
rows `[i R, (i + 1) R)`, with each image's segment: the positions that see it, from transformers'
`get_cross_attention_token_mask` (the range of the images the last prompt token sees stays open, since
generation repeats the last row of the mask for every new token), and its real rows. A text-only sequence's
slot gets length 0 (its cross-attention layers pass it through). All the images of a request are encoded in
its first step, so they count against that step's encoder budget together (`encoder_len`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from model_lib.vision.mllama import MllamaConfig
from serving.engine.scheduler import ScheduledSequence
from serving.multimodal.encoder import ImageEncoder
from serving.multimodal.images import to_rgb
from serving.multimodal.inputs import ImageInputs, ImageItem

OPEN_END = np.iinfo(np.int32).max  # a segment seen by every later position


class MllamaImageInputs(ImageInputs):
    """`ImageInputs` whose images keep their real tiles by grid, one `<|image|>` token each."""

    config: MllamaConfig

    def preprocess(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        rgb = to_rgb(image)
        out = self.processor(images=[rgb], return_tensors="np")
        tiles = np.asarray(out["pixel_values"], np.float32)[0, 0]  # [T, C, H, W], padding tiles last
        grid = self.config.vision.supported_aspect_ratios[int(np.asarray(out["aspect_ratio_ids"])[0, 0]) - 1]
        return tiles[: grid[0] * grid[1]].reshape(*grid, *tiles.shape[1:]), (rgb.height, rgb.width)

    @staticmethod
    def _paired(prompt_ids: Sequence[int], token: int, media: list, kind: str) -> list[tuple[int, int, Any]]:
        starts = [i for i, t in enumerate(prompt_ids) if t == token]
        if len(starts) != len(media):
            raise ValueError(f"the prompt has {len(starts)} {kind} placeholder(s) and {len(media)} {kind}(s) "
                             "were given")
        return [(start, 1, m) for start, m in zip(starts, media)]


def image_segments(config: MllamaConfig, prompt_ids: Sequence[int], items: Sequence[ImageItem]) -> np.ndarray:
    """`[max_images, 3]` int32: per image of the prompt, the first and past-last positions that see it and its
    real rows (unused segments are seen by none)."""
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    segments = np.zeros((config.max_images, 3), np.int32)
    ranges = get_cross_attention_token_mask(list(prompt_ids), config.image_token_id)
    for i, ((start, end), item) in enumerate(zip(ranges, items)):
        end = OPEN_END if end == -1 or end >= len(prompt_ids) else end
        segments[i] = start, end, num_tiles(item) * config.vision.tile_tokens
    return segments


def num_tiles(item: ImageItem) -> int:
    return item.pixel_values.shape[0] * item.pixel_values.shape[1]


def padded_tiles(config: MllamaConfig, grid: np.ndarray) -> tuple[np.ndarray, np.int32, np.ndarray]:
    """An image's tiles by grid `[a, b, C, H, W]` (`MllamaImageInputs`) as the vision model takes them: padded
    with zero tiles to `[T, C, H, W]`, its aspect ratio id and its aspect ratio mask `[T]` (the processor's)."""
    vision = config.vision
    n = grid.shape[0] * grid.shape[1]
    pixels = np.zeros((vision.max_num_tiles, *grid.shape[2:]), np.float32)
    pixels[:n] = grid.reshape(n, *grid.shape[2:])
    ratio = vision.supported_aspect_ratios.index(tuple(grid.shape[:2])) + 1
    return pixels, np.int32(ratio), (np.arange(vision.max_num_tiles) < n).astype(np.int32)


def _fill(graphdef, state, pools, *args):
    return nnx.merge(graphdef, state).fill_image_kv(pools, *args)


@partial(jax.jit, donate_argnums=(0,))
def _clear(pools: tuple, slot: jax.Array) -> tuple:
    return tuple((k, v, lengths.at[slot].set(0), segments) for k, v, lengths, segments in pools)


class MllamaImageEncoder(ImageEncoder):
    """Fills the cross-attention pools of the sequences a step starts; merges nothing into the step."""

    def __init__(self, model: nnx.Module, budget: int):
        self.config: MllamaConfig = model.config.multimodal
        self.budget = budget
        self.graphdef, self.state = nnx.split(model)  # the cross layers' projections read the features too
        self._fill = jax.jit(_fill, static_argnums=0, donate_argnums=(2,))
        self.num_encoded = 0

    def encoder_len(self, items: Sequence[ImageItem]) -> int:
        return len(items) * self.config.image_rows

    def check_fits(self, items: Sequence[ImageItem]) -> None:
        """ValueError for more images than a slot's pools hold, or more rows than one step's encoder budget."""
        if len(items) > self.config.max_images:
            raise ValueError(f"the prompt has {len(items)} images; the cross-attention pools hold "
                             f"{self.config.max_images} per prompt (--limit-mm-per-prompt)")
        if self.encoder_len(items) > self.budget:
            raise ValueError(f"{len(items)} images of {self.config.image_rows} rows exceed the encoder budget of "
                             f"{self.budget} rows per step (max_num_encoder_input_tokens)")

    def empty(self, token_pad: int) -> None:
        return None  # no step variant with image rows

    def merged(self, scheduled: Sequence[ScheduledSequence], token_pad: int) -> None:
        return None

    def tiles(self, item: ImageItem) -> tuple[np.ndarray, np.int32, np.ndarray]:
        return padded_tiles(self.config, item.pixel_values)

    def fill(self, runner: Any, scheduled: Sequence[ScheduledSequence]) -> None:
        """Write the cross K/V (or length 0) of the sequences this step starts into their slots."""
        for item in scheduled:
            seq = item.seq
            if seq.num_computed == 0:
                self.fill_slot(runner, seq.slot, seq.prompt_ids, seq.images)

    def fill_slot(self, runner: Any, slot: int, prompt_ids: Sequence[int], images: Sequence[ImageItem]) -> None:
        entries = [runner.layer_entry[layer] for layer in self.config.cross_attention_layers]
        pools = tuple(runner.kv_caches[e] for e in entries)
        if not images:
            pools = _clear(pools, np.int32(slot))
        else:
            segments = image_segments(self.config, prompt_ids, images)
            length = np.int32(self.encoder_len(images))
            for index, image in enumerate(images):
                pools = self._fill(self.graphdef, self.state, pools, *self.tiles(image), np.int32(slot),
                                   np.int32(index), length, segments)
                self.num_encoded += 1
        for entry, pool in zip(entries, pools):
            runner.kv_caches[entry] = pool

    def warm_up(self, runner: Any) -> None:
        """Compile the fill and the clear on the padding slot (left cleared)."""
        vision = self.config.vision
        grid = vision.supported_aspect_ratios[0]
        shape = (*grid, vision.num_channels, vision.image_size, vision.image_size)
        image = ImageItem(0, 1, "", np.zeros(shape, np.float32))
        pad = runner.max_num_seqs
        self.fill_slot(runner, pad, [self.config.image_token_id], [image])
        self.fill_slot(runner, pad, [], [])
        self.num_encoded -= 1
        jax.block_until_ready(runner.kv_caches)
