"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

The language model is Qwen2's (q/k/v bias, per-layer sliding window) with M-RoPE: `rope_parameters`
carries `mrope_section`. The vision tower is `model_lib/vision/qwen_vit.py`. Checkpoints name
the parts by the transformers version that saved them: hub ones `model.layers.*`, `visual.*`,
`lm_head`; transformers 5 `model.language_model.*`, `model.visual.*`, `lm_head`. Both load;
saving writes the transformers 5 names.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import PER_LAYER_TYPE, hf_json, llama_like_fields
from model_lib.layers.rotary import mrope_axes
from model_lib.registry import Family
from model_lib.vision.qwen_vit import QwenVisionConfig
from model_lib.vision.qwen_vl import QwenVLConfig
from model_lib.weight_map import IDENTITY, WeightMap


def _single(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        raise ValueError(f"a non-square vision {name} {list(value)} is not supported")
    return int(value)


def _vision_common(vision: PretrainedConfig) -> dict:
    rope = dict(getattr(vision, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "axial")
    if kind != "axial":
        raise ValueError(f"vision rope_type {kind!r} is not supported (only 'axial')")
    return dict(
        depth=vision.depth,
        num_heads=vision.num_heads,
        patch_size=_single(vision.patch_size, "patch_size"),
        temporal_patch_size=_single(vision.temporal_patch_size, "temporal_patch_size"),
        in_channels=vision.in_channels,
        spatial_merge_size=vision.spatial_merge_size,
        activation=vision.hidden_act,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def qwen2_vision_config(vision: PretrainedConfig) -> QwenVisionConfig:
    return QwenVisionConfig(**_vision_common(vision), hidden_size=vision.embed_dim,
                            intermediate_size=int(vision.embed_dim * vision.mlp_ratio),
                            out_hidden_size=vision.hidden_size)


def qwen2_5_vision_config(vision: PretrainedConfig) -> QwenVisionConfig:
    return QwenVisionConfig(**_vision_common(vision), hidden_size=vision.hidden_size,
                            intermediate_size=vision.intermediate_size, out_hidden_size=vision.out_hidden_size,
                            norm="rms", gated_mlp=True, window_size=vision.window_size,
                            fullatt_block_indexes=tuple(vision.fullatt_block_indexes))


VISION_CONFIGS = {
    "Qwen2VLForConditionalGeneration": qwen2_vision_config,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vision_config,
}


def qwen_vl_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    text = hf.text_config
    fields = llama_like_fields(text, architecture, "qwen_vl", windows=PER_LAYER_TYPE, reads_head_dim=False)
    rope = fields["rope"]
    section = tuple((getattr(text, "rope_parameters", None) or {}).get("mrope_section") or ())
    if rope.kind != "default":
        raise ValueError(f"{architecture} with rope_type {rope.kind!r} is not supported (only 'default' M-RoPE)")
    rope = dataclasses.replace(rope, mrope_section=section)
    mrope_axes(rope)  # checks the sections
    vision = VISION_CONFIGS[architecture](hf.vision_config)
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"the vision merger's output width {vision.out_hidden_size} differs from the text "
                         f"hidden_size {text.hidden_size}")
    if not 0 <= hf.image_token_id < text.vocab_size:
        raise ValueError(f"image_token_id {hf.image_token_id} is outside the vocabulary ({text.vocab_size})")
    return ModelConfig(**{
        **fields,
        "qkv_bias": True,
        "o_bias": False,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "rope": rope,
        "multimodal": QwenVLConfig(vision=vision, image_token_id=hf.image_token_id),
        "hf_config_json": hf_json(hf),
    })


QWEN_VL_WEIGHTS = WeightMap(
    # Hub checkpoints (transformers 4) -> transformers 5 names, our canonical HF layout.
    key_renames=(
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    ),
    renames=(
        ("model.visual.merger.mlp.0", "model.visual.merger.fc1"),
        ("model.visual.merger.mlp.2", "model.visual.merger.fc2"),
    ),
    relocated=(("model.language_model", "model"), ("model.visual", "visual")),
    ignored=IDENTITY.ignored,
)

QWEN_VL = Family("qwen_vl", qwen_vl_config, QWEN_VL_WEIGHTS,
                 quirks="Qwen ViT (2D RoPE, window attention in 2.5) + M-RoPE; images merged at placeholders")
