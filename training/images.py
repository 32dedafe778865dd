"""Images in training data: chat messages with image parts, for vision-language models.

A record's `messages` may hold `{"type": "image", "image": <path or URL>}` parts (paths relative
to the data file's folder; `data:` URLs carry base64 images inline) or OpenAI's `image_url` parts.
Each image is preprocessed by the checkpoint's own image processor, its placeholder expanded to
the image's feature rows, and those positions carry no loss (Mllama keeps its one `<|image|>` token per
image, without loss, and reads the image's tiles by cross attention). The vision tower and projector stay
frozen unless LoRA targets them by a regex over their module paths. Only the families in
`TRAINS_IMAGES` train on images (their loss and gradients match transformers'); any other is
refused by name, since its batches would need inputs the trainer does not build.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model_lib.vision.mllama import MllamaConfig
from model_lib.vision.qwen_vit import VisionLayout, vision_layout
from model_lib.vision.qwen_vl import QwenVLConfig
from serving.multimodal.images import load_image_processor
from serving.multimodal.inputs import MAX_IMAGES_PER_PROMPT, ImageItem
from serving.multimodal.media import MediaFetcher
from serving.multimodal.mllama import padded_tiles
from serving.multimodal.prompts import inputs_class

IGNORE = -100

# Grid-sized images (Qwen2/2.5/3-VL, GLM-4.1V): each image's patch rows and tower layout padded to the run's most
# patches (padding rows attend only among themselves), each row's M-RoPE positions computed on the host
# (`data._batch_grids`); Qwen3-VL's DeepStack sets ride beside each feature row.
GRID_FAMILIES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Glm4vForConditionalGeneration",
                 "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
# Families whose images train through the trainer's batches: each image's pixels (tiles padded to the batch's
# most) encoded by the model's own `encode`, tile by tile, its rows placed by the run's layout (any-res tiles:
# arranged first by `ExampleImage.layout`, computed on the host from the image's size); loss and gradients
# checked against transformers' in tests/training/test_vlm_parity.py. Mllama's images are no rows: each slot holds
# every tile and its aspect ratio, and each token the tiles it sees (`training.data.Batch`). Images of their own
# size (Pixtral's) pad to the run's largest, each encoded within its own size, its rows placed in the padded grid
# (`ExampleImage.own_grid`).
TRAINS_IMAGES = ("LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration", "InternVLForConditionalGeneration",
                 "Llama4ForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "LlavaOnevisionForConditionalGeneration", "MllamaForConditionalGeneration",
                 "Mistral3ForConditionalGeneration", *GRID_FAMILIES)


def refuse_untrained_images(architecture: str) -> None:
    """ValueError naming a vision-language family whose image batches the trainer has no parity-checked layout for
    (every served family has one; a new one is refused until it does)."""
    if architecture not in TRAINS_IMAGES:
        raise ValueError(f"fine-tuning {architecture} on image data is not supported yet (its batches would need "
                         "inputs the trainer does not build); text-only data trains")


@dataclass
class ExampleImage:
    offset: int  # first token of the image's placeholder run
    length: int  # tokens of the run
    pixel_values: np.ndarray  # [C, H, W] or tiles [N, C, H, W], float32
    # Per token of the run: its feature row, or -1 for a token that keeps its embedding (InternVL's <img>);
    # None when token k takes row k.
    rows: np.ndarray | None = None
    # Any-res tiles (LLaVA-NeXT, OneVision): how the encoded tiles and image_newline make the run's rows
    # (`model_lib/vision/anyres.py` pack_layout: sources and weights, [rows, TAPS] each).
    layout: tuple[np.ndarray, np.ndarray] | None = None
    # Images read by cross attention (Mllama): the tile grid's aspect ratio id (from 1) and its real tiles, the
    # first of `pixel_values`' [max_num_tiles, C, H, W]; None for the families whose tokens take feature rows.
    aspect_ratio_id: int | None = None
    tiles: int = 0
    # Grid-sized images (Qwen-VL): pixel_values are the processor's patch rows [N, C*Tp*P*P]; the tower's host
    # layout of them, and the merged grid (t, h, w) of the run, which places it in the row's M-RoPE positions.
    vision_layout: VisionLayout | None = None
    merged_grid: tuple[int, int, int] | None = None
    # Images of their own size (Pixtral): (rows, columns) of the image's feature grid; its pixels pad to the run's
    # largest and its rows sit at their places in the padded grid (`training/data.py`).
    own_grid: tuple[int, int] | None = None

    @property
    def feature_rows(self) -> int:
        return self.length if self.rows is None else int((self.rows >= 0).sum())


class TrainingImages:
    """Fetches, preprocesses and places a VLM's training images (one per placeholder of a chat)."""

    def __init__(self, checkpoint: str | Path, config: Any, data_folder: str | Path):
        self.architecture = config.architecture
        mm = config.multimodal
        if mm.prompt_tokens:  # ids of image-run tokens that only the tokenizer knows (InternVL's <img>), as serving
            from transformers import AutoTokenizer

            mm = mm.with_tokenizer(AutoTokenizer.from_pretrained(checkpoint, local_files_only=True))
        self.inputs = inputs_class(mm)(mm, load_image_processor(checkpoint), MAX_IMAGES_PER_PROMPT)
        self.folder = Path(data_folder).resolve()
        self.media = MediaFetcher(self.folder)

    def fetch(self, source: str) -> bytes:
        """A URL (`data:`, http(s), `file:` under the data folder) or a path (relative to the data folder)."""
        if ":" in source.split("/", 1)[0]:
            return self.media.fetch(source)
        return self.media.fetch((self.folder / source).resolve().as_uri())

    def expand(
        self, ids: list[int], labels: list[int], images: Sequence[Any]
    ) -> tuple[list[int], list[int], list[ExampleImage]]:
        """Placeholders expanded in `ids` (labels: no loss on them) and the images where they sit."""
        refuse_untrained_images(self.architecture)
        expanded, items = self.inputs(ids, images)
        # Every token of an image's run (row breaks and <img> markers too) carries no loss; the text keeps its labels.
        marker = self.inputs.config.prompt_token_id
        text_labels = iter(label for t, label in zip(ids, labels) if t != marker)
        inside = np.zeros(len(expanded), bool)
        for item in items:
            inside[item.offset : item.end] = True
        new_labels = [IGNORE if run else next(text_labels) for run in inside]
        return expanded, new_labels, [self._example_image(item) for item in items]

    def _example_image(self, item: ImageItem) -> ExampleImage:
        mm = self.inputs.config
        if isinstance(mm, MllamaConfig):  # every tile as the vision model takes them, as serving pads them
            pixels, ratio, mask = padded_tiles(mm, item.pixel_values)
            return ExampleImage(item.offset, item.length, pixels, aspect_ratio_id=int(ratio), tiles=int(mask.sum()))
        layout, own_grid = getattr(mm, "layout", None), getattr(mm, "own_size_grid", None)
        return replace(ExampleImage(item.offset, item.length, item.pixel_values, item.rows,
                                    None if layout is None else layout(item.pixel_values, item.image_size),
                                    own_grid=None if own_grid is None else own_grid(item.pixel_values)),
                       **grid_image(mm, item.pixel_values))


def grid_image(config: Any, pixels: np.ndarray) -> dict[str, Any]:
    """A Qwen-VL image's `ExampleImage` fields from its patch rows by grid `[t, h, w, C*Tp*P*P]` (none for the
    other families)."""
    if not isinstance(config, QwenVLConfig):
        return {}
    grid = tuple(int(x) for x in pixels.shape[:3])
    return dict(pixel_values=pixels.reshape(-1, pixels.shape[-1]), vision_layout=vision_layout(config.vision, grid),
                merged_grid=config.merged_grid(grid))
