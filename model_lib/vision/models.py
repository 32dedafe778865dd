"""Architecture -> the vision-language module class that builds it (imported on first use)."""

from __future__ import annotations

import importlib

from model_lib.decoder import CausalLM

VISION_LANGUAGE_MODELS = {
    "LlavaForConditionalGeneration": "model_lib.vision.llava:LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "model_lib.vision.llava_next:LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "model_lib.vision.llava_next:LlavaOnevisionForConditionalGeneration",
    "Mistral3ForConditionalGeneration": "model_lib.vision.mistral3:Mistral3ForConditionalGeneration",
    "InternVLForConditionalGeneration": "model_lib.vision.internvl:InternVLForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "model_lib.vision.gemma3:Gemma3ForConditionalGeneration",
    "Llama4ForConditionalGeneration": "model_lib.vision.llama4:Llama4ForConditionalGeneration",
    "MllamaForConditionalGeneration": "model_lib.vision.mllama:MllamaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "model_lib.vision.qwen_vl:QwenVLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "model_lib.vision.qwen_vl:QwenVLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "model_lib.vision.qwen_vl:QwenVLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "model_lib.vision.qwen_vl:QwenVLForConditionalGeneration",
    "Glm4vForConditionalGeneration": "model_lib.vision.qwen_vl:QwenVLForConditionalGeneration",
}


def vision_model_class(architecture: str) -> type[CausalLM]:
    """A `VisionLanguageModel` (Qwen-VL: its own `CausalLM`, `model_lib/vision/qwen_vl.py`)."""
    target = VISION_LANGUAGE_MODELS.get(architecture)
    if target is None:
        raise ValueError(f"{architecture} has no vision-language module; known: {sorted(VISION_LANGUAGE_MODELS)}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
