"""Images in training data: chat messages with image parts, for vision-language models.

A record's `messages` may hold `{"type": "image", "image": <path or URL>}` parts (paths relative
to the data file's folder; `data:` URLs carry base64 images inline) or OpenAI's `image_url` parts.
Each image is preprocessed by the checkpoint's own image processor, its placeholder expanded to
the image's feature rows, and those positions carry no loss. The vision tower and projector stay
frozen unless LoRA targets them by a regex over their module paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model_lib.vision.qwen_vl import QwenVLConfig
from serving.multimodal.images import load_image_processor
from serving.multimodal.inputs import MAX_IMAGES_PER_PROMPT, ImageInputs
from serving.multimodal.media import MediaFetcher

IGNORE = -100


@dataclass
class ExampleImage:
    offset: int  # first placeholder token
    length: int  # placeholder tokens (feature rows)
    pixel_values: np.ndarray  # [C, H, W] float32


class TrainingImages:
    """Fetches, preprocesses and places a VLM's training images (one per placeholder of a chat)."""

    def __init__(self, checkpoint: str | Path, config: Any, data_folder: str | Path):
        self.inputs = ImageInputs(config.multimodal, load_image_processor(checkpoint), MAX_IMAGES_PER_PROMPT)
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
        if isinstance(self.inputs.config, QwenVLConfig):
            raise ValueError("fine-tuning a Qwen-VL model on image data is not supported yet (its batches would "
                             "need grid-sized images and M-RoPE positions; GLM-4.1V likewise); text-only data trains")
        expanded, items = self.inputs(ids, images)
        token = self.inputs.config.image_token_id
        text_labels = iter(label for t, label in zip(ids, labels) if t != token)
        new_labels = [IGNORE if t == token else next(text_labels) for t in expanded]
        return expanded, new_labels, [ExampleImage(i.offset, i.length, i.pixel_values) for i in items]
