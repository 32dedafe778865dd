"""Images in training data: chat messages with image parts, for vision-language models.

A record's `messages` may hold `{"type": "image", "image": <path or URL>}` parts (paths relative
to the data file's folder; `data:` URLs carry base64 images inline) or OpenAI's `image_url` parts.
Each image is preprocessed by the checkpoint's own image processor, its placeholder expanded to
the image's feature rows, and those positions carry no loss. The vision tower and projector stay
frozen unless LoRA targets them by a regex over their module paths. Only the families in
`TRAINS_IMAGES` train on images (their loss and gradients match transformers'); the others are
refused by name, since their batches would need inputs the trainer does not build yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving.multimodal.images import load_image_processor
from serving.multimodal.inputs import MAX_IMAGES_PER_PROMPT, ImageInputs
from serving.multimodal.media import MediaFetcher

IGNORE = -100

# Families whose images train through the trainer's batches: each image's pixels (tiles padded to the batch's
# most) encoded by the model's own `encode`, tile by tile, its rows placed by the run's layout (any-res tiles:
# arranged first by `ExampleImage.layout`, computed on the host from the image's size); loss and gradients
# checked against transformers' in tests/training/test_vlm_parity.py. Images of their own size (Pixtral's) pad to the
# run's largest, each encoded within its own size, its rows placed in the padded grid (`ExampleImage.own_grid`).
TRAINS_IMAGES = ("LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration", "InternVLForConditionalGeneration",
                 "Llama4ForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "LlavaOnevisionForConditionalGeneration", "Mistral3ForConditionalGeneration")
# Why the other served families cannot train on images yet; text-only data trains.
_NEEDS = {
    "MllamaForConditionalGeneration": "cross-attention inputs (aspect ratio ids and mask, a cross-attention mask)",
    "Qwen2VLForConditionalGeneration": "grid-sized images and M-RoPE positions",
    "Qwen2_5_VLForConditionalGeneration": "grid-sized images and M-RoPE positions",
    "Qwen3VLForConditionalGeneration": "grid-sized images, M-RoPE positions and DeepStack rows",
    "Qwen3VLMoeForConditionalGeneration": "grid-sized images, M-RoPE positions and DeepStack rows",
    "Glm4vForConditionalGeneration": "grid-sized images and M-RoPE positions",
}


def refuse_untrained_images(architecture: str) -> None:
    """ValueError naming a vision-language family whose image batches the trainer would build wrongly."""
    if architecture not in TRAINS_IMAGES:
        need = _NEEDS.get(architecture, "inputs the trainer does not build")
        raise ValueError(f"fine-tuning {architecture} on image data is not supported yet (its batches would need "
                         f"{need}); text-only data trains")


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
        self.inputs = ImageInputs(mm, load_image_processor(checkpoint), MAX_IMAGES_PER_PROMPT)
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
        layout = getattr(self.inputs.config, "layout", None)
        grid = getattr(self.inputs.config, "own_size_grid", None)
        return expanded, new_labels, [
            ExampleImage(i.offset, i.length, i.pixel_values, i.rows,
                         None if layout is None else layout(i.pixel_values, i.image_size),
                         own_grid=None if grid is None else grid(i.pixel_values)) for i in items]
