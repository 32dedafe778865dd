"""Qwen2-VL, Qwen2.5-VL and GLM-4.1V (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
`Glm4vForConditionalGeneration`).

The language model is Qwen2's (q/k/v bias, per-layer sliding window) or GLM-4's (sandwich norms,
fused `gate_up_proj`, partial rotary on interleaved pairs) with M-RoPE: `rope_parameters` carries
`mrope_section`, which splits the rotary frequencies (not the pairs) into t, h, w sections. The
vision towers are `model_lib/vision/qwen_vit.py` and `glm4v_vit.py`. Checkpoints name the parts by
the transformers version that saved them: hub ones `model.layers.*`, `visual.*`, `lm_head`;
transformers 5 `model.language_model.*`, `model.visual.*`, `lm_head`. Both load; saving writes
the transformers 5 names.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import PER_LAYER_TYPE, gate_up_fused, hf_json, llama_like_fields
from model_lib.families.glm import glm4_norm_renames
from model_lib.layers.rotary import mrope_axes
from model_lib.registry import Family
from model_lib.vision.glm4v_vit import GlmVisionConfig
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


def glm4v_vision_config(vision: PretrainedConfig) -> GlmVisionConfig:
    common = _vision_common(vision)
    image_size = _single(vision.image_size, "image_size")
    if image_size % common["patch_size"]:
        raise ValueError(f"vision image_size {image_size} is not a multiple of patch_size {common['patch_size']}")
    # The blocks' MLP is `out_hidden_size` wide; `intermediate_size` is the merger's.
    return GlmVisionConfig(**common, hidden_size=vision.hidden_size, intermediate_size=vision.out_hidden_size,
                           out_hidden_size=vision.out_hidden_size, merger_intermediate_size=vision.intermediate_size,
                           norm="rms", gated_mlp=True, norm_eps=vision.rms_norm_eps,
                           qkv_bias=bool(vision.attention_bias), proj_bias=False, mlp_bias=False,
                           position_grid=image_size // common["patch_size"])


VISION_CONFIGS = {
    "Qwen2VLForConditionalGeneration": qwen2_vision_config,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vision_config,
    "Glm4vForConditionalGeneration": glm4v_vision_config,
}


def _with_images(hf: PretrainedConfig, architecture: str, fields: dict, default_section: tuple[int, ...] = (),
                 **text: object) -> ModelConfig:
    """The text decoder's `fields` (and `text` overrides) with M-RoPE sections and the vision tower."""
    text_config = hf.text_config
    rope = dataclasses.replace(fields["rope"], **text.pop("rope", {}))
    section = tuple((getattr(text_config, "rope_parameters", None) or {}).get("mrope_section") or default_section)
    if rope.kind != "default":
        raise ValueError(f"{architecture} with rope_type {rope.kind!r} is not supported (only 'default' M-RoPE)")
    rope = dataclasses.replace(rope, mrope_section=section)
    mrope_axes(rope)  # checks the sections
    vision = VISION_CONFIGS[architecture](hf.vision_config)
    if vision.out_hidden_size != text_config.hidden_size:
        raise ValueError(f"the vision merger's output width {vision.out_hidden_size} differs from the text "
                         f"hidden_size {text_config.hidden_size}")
    if not 0 <= hf.image_token_id < text_config.vocab_size:
        raise ValueError(f"image_token_id {hf.image_token_id} is outside the vocabulary ({text_config.vocab_size})")
    return ModelConfig(**{
        **fields,
        **text,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "rope": rope,
        "multimodal": QwenVLConfig(vision=vision, image_token_id=hf.image_token_id),
        "hf_config_json": hf_json(hf),
    })


def qwen_vl_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf.text_config, architecture, "qwen_vl", windows=PER_LAYER_TYPE, reads_head_dim=False)
    return _with_images(hf, architecture, fields, qkv_bias=True, o_bias=False)


def glm4v_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    """GLM-4's decoder (`model_lib/families/glm.py`): its attention always has q/k/v biases, and rotates
    `partial_rotary_factor` of each head as interleaved pairs; `mrope_section` defaults to (8, 12, 12)
    as transformers' rotary does."""
    fields = llama_like_fields(hf.text_config, architecture, "glm4v", partial_rotary=True, reads_head_dim=False)
    return _with_images(hf, architecture, fields, (8, 12, 12), qkv_bias=True, o_bias=False, block_norms="sandwich",
                        rope={"interleaved": True})


# Hub checkpoints (transformers 4) -> transformers 5 names, our canonical HF layout.
_VL_KEY_RENAMES = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)
_VL_RELOCATED = (("model.language_model", "model"), ("model.visual", "visual"))

QWEN_VL_WEIGHTS = WeightMap(
    key_renames=_VL_KEY_RENAMES,
    renames=(
        ("model.visual.merger.mlp.0", "model.visual.merger.fc1"),
        ("model.visual.merger.mlp.2", "model.visual.merger.fc2"),
    ),
    relocated=_VL_RELOCATED,
    ignored=IDENTITY.ignored,
)
GLM4V_WEIGHTS = WeightMap(
    key_renames=_VL_KEY_RENAMES,
    renames=glm4_norm_renames("model.language_model.layers"),
    fused=(gate_up_fused("model.language_model.layers.{i}.mlp.gate_up_proj", "model.language_model.layers.{i}.mlp"),),
    relocated=_VL_RELOCATED,
    ignored=IDENTITY.ignored,
)

QWEN_VL = Family("qwen_vl", qwen_vl_config, QWEN_VL_WEIGHTS,
                 quirks="Qwen ViT (2D RoPE, window attention in 2.5) + M-RoPE; images merged at placeholders")
GLM4V = Family("glm4v", glm4v_config, GLM4V_WEIGHTS,
               quirks="GLM-4 decoder with M-RoPE on interleaved partial rotary; ViT with resampled learned "
                      "positions, downsample conv and GLU merger")
