"""The multimodal side of the offline API's prompts (vLLM's convention):
`{"prompt": str or "prompt_token_ids": [...], "multi_modal_data": {"image": image or [images], "video": frames}}`;
videos travel with the images as `Video`s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_lib.config import ModelConfig
from model_lib.vision.mllama import MllamaConfig
from model_lib.vision.qwen_vl import QwenVLConfig
from serving.multimodal.images import load_image_processor
from serving.multimodal.inputs import ImageInputs, Video, refuse_unserved

DEFAULT_IMAGES_PER_PROMPT = 16  # vLLM's --limit-mm-per-prompt default is per modality too
MODALITIES = ("image", "video")


def split_prompt(prompt: Any) -> tuple[Any, list[Any]]:
    """(the prompt without `multi_modal_data`, its images); a text prompt has none.

    `{"prompt": text}` without token ids comes back as the text (vLLM's TextPrompt)."""
    if not isinstance(prompt, dict):
        return prompt, []
    if "multi_modal_data" not in prompt:
        text = prompt.get("prompt")
        return (text, []) if "prompt_token_ids" not in prompt and isinstance(text, str) else (prompt, [])
    data = prompt["multi_modal_data"]
    if not isinstance(data, dict) or set(data) - set(MODALITIES):
        raise ValueError(f"multi_modal_data must be a dict with the keys {MODALITIES}")
    images = data.get("image", [])
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    images += [Video(frames) for frames in videos_of(data.get("video"))]
    rest = {k: v for k, v in prompt.items() if k != "multi_modal_data"}
    if "prompt_token_ids" not in rest:
        if not isinstance(rest.get("prompt"), str):
            raise ValueError("a multimodal prompt needs 'prompt' (text) or 'prompt_token_ids'")
        return rest["prompt"], images
    return rest, images


def videos_of(value: Any) -> list[Any]:
    """`multi_modal_data["video"]`: one video (a list of frames, or a `[F, H, W, 3]` array) or a list of them."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return [value] if value.ndim == 4 else [[value]]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("multi_modal_data video must be a list of frames, a [F, H, W, 3] array, or a list of those")
    first = value[0]
    several = isinstance(first, (list, tuple)) or (isinstance(first, np.ndarray) and first.ndim == 4)
    return list(value) if several else [value]


def image_inputs(path: str | Path, config: ModelConfig, limit_mm_per_prompt: dict[str, int] | None) -> ImageInputs | None:
    """The image side of a checkpoint's prompts (None for a text-only model)."""
    if limit_mm_per_prompt is not None and not isinstance(limit_mm_per_prompt, dict):
        raise ValueError("limit_mm_per_prompt must map modalities to counts, e.g. {'image': 2}")
    limits = dict(limit_mm_per_prompt or {})
    if set(limits) - set(MODALITIES) or not all(isinstance(v, int) for v in limits.values()):
        raise ValueError(f"limit_mm_per_prompt takes the modalities {MODALITIES}, got {sorted(limits)}")
    mm = config.multimodal
    if mm is None:
        return None
    refuse_unserved(config)
    if mm.prompt_tokens:  # ids of image-run tokens that only the tokenizer knows (Mistral 3's [IMG_BREAK])
        from transformers import AutoTokenizer

        mm = mm.with_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    default = mm.default_image_limit or DEFAULT_IMAGES_PER_PROMPT
    return inputs_class(mm)(mm, load_image_processor(path), limits.get("image", default),
                            limits.get("video", DEFAULT_IMAGES_PER_PROMPT) if mm.video_token_id is not None else 0)


def inputs_class(mm: Any) -> type[ImageInputs]:
    """The `ImageInputs` that pairs a family's images with its prompt (`mm`: its multimodal config)."""
    from serving.multimodal.mllama import MllamaImageInputs
    from serving.multimodal.qwen_vl import QwenImageInputs

    if isinstance(mm, QwenVLConfig):
        return QwenImageInputs
    return MllamaImageInputs if isinstance(mm, MllamaConfig) else ImageInputs
