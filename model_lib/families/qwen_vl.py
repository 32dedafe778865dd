"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4.1V (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`,
`Glm4vForConditionalGeneration`).

The language model is Qwen2's (q/k/v bias, per-layer sliding window) with M-RoPE: `rope_parameters`
carries `mrope_section`. Qwen3-VL's is Qwen3's (q/k RMSNorm per head, `attention_bias`, no window),
or Qwen3-MoE's, with interleaved M-RoPE (`mrope_section` defaults to transformers' [24, 20, 20]).
GLM-4.1V's is GLM-4's (sandwich norms, fused `gate_up_proj`, partial rotary on interleaved pairs),
whose `mrope_section` splits the rotary frequencies (not the pairs) into t, h, w sections.
The vision towers are `model_lib/vision/qwen_vit.py` and `glm4v_vit.py`. Checkpoints name the parts by
the transformers version that saved them: hub ones `model.layers.*`, `visual.*`, `lm_head`; transformers 5
`model.language_model.*`, `model.visual.*`, `lm_head`. Both load; saving writes the transformers 5
names. Qwen3-VL-MoE stores each layer's experts fused, gate then up: hub checkpoints `[in, out]`
(`experts.gate_up_proj [X, E, 2I]`, `experts.down_proj [X, I, E]`), transformers 5 `[out, in]`; both
load (by shape, as transformers decides), saving writes `[out, in]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import NO_WINDOW, PER_LAYER_TYPE, gate_up_fused, hf_json, llama_like_fields
from model_lib.families.glm import glm4_norm_renames
from model_lib.families.qwen_moe import qwen_moe_fields
from model_lib.layers.rotary import mrope_axes
from model_lib.registry import Family
from model_lib.vision.glm4v_vit import GlmVisionConfig
from model_lib.vision.qwen_vit import QwenVisionConfig
from model_lib.vision.qwen_vl import QwenVLConfig
from model_lib.weight_map import IDENTITY, Fused, WeightMap

QWEN3_MROPE_SECTION = (24, 20, 20)  # what transformers' Qwen3-VL rotary takes when the config names none


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


def qwen3_vision_config(vision: PretrainedConfig) -> QwenVisionConfig:
    return QwenVisionConfig(**_vision_common(vision), hidden_size=vision.hidden_size,
                            intermediate_size=vision.intermediate_size, out_hidden_size=vision.out_hidden_size,
                            patch_bias=True, num_position_embeddings=vision.num_position_embeddings,
                            deepstack_indexes=tuple(int(i) for i in vision.deepstack_visual_indexes))


def qwen2_text_fields(text: PretrainedConfig, architecture: str) -> dict:
    fields = llama_like_fields(text, architecture, "qwen_vl", windows=PER_LAYER_TYPE, reads_head_dim=False)
    return {**fields, "qkv_bias": True, "o_bias": False}


def qwen3_text_fields(text: PretrainedConfig, architecture: str) -> dict:
    fields = llama_like_fields(text, architecture, "qwen3_vl", attention_bias=True, windows=NO_WINDOW)
    return {**fields, "qk_norm": "head"}


def qwen3_moe_text_fields(text: PretrainedConfig, architecture: str) -> dict:
    # The router always renormalises its top-k weights (the config has no norm_topk_prob).
    return {**qwen3_text_fields(text, architecture), "family": "qwen3_vl_moe",
            **qwen_moe_fields(text, norm_topk_prob=True)}


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


def glm4v_text_fields(text: PretrainedConfig, architecture: str) -> dict:
    """GLM-4's decoder (`model_lib/families/glm.py`): its attention always has q/k/v biases, and rotates
    `partial_rotary_factor` of each head as interleaved pairs."""
    fields = llama_like_fields(text, architecture, "glm4v", partial_rotary=True, reads_head_dim=False)
    return {**fields, "qkv_bias": True, "o_bias": False, "block_norms": "sandwich",
            "rope": dataclasses.replace(fields["rope"], interleaved=True)}


@dataclasses.dataclass(frozen=True)
class QwenVLVariant:
    """What sets one Qwen-VL generation apart: its tower's and its language model's config readers."""

    vision: Callable[[PretrainedConfig], QwenVisionConfig]
    text: Callable[[PretrainedConfig, str], dict]
    interleaved_mrope: bool = False
    default_mrope_section: tuple[int, ...] = ()


VARIANTS = {
    "Qwen2VLForConditionalGeneration": QwenVLVariant(qwen2_vision_config, qwen2_text_fields),
    "Qwen2_5_VLForConditionalGeneration": QwenVLVariant(qwen2_5_vision_config, qwen2_text_fields),
    "Qwen3VLForConditionalGeneration": QwenVLVariant(qwen3_vision_config, qwen3_text_fields, True,
                                                     QWEN3_MROPE_SECTION),
    "Qwen3VLMoeForConditionalGeneration": QwenVLVariant(qwen3_vision_config, qwen3_moe_text_fields, True,
                                                        QWEN3_MROPE_SECTION),
    # transformers' GLM-4.1V rotary defaults its sections to (8, 12, 12).
    "Glm4vForConditionalGeneration": QwenVLVariant(glm4v_vision_config, glm4v_text_fields, False, (8, 12, 12)),
}


def qwen_vl_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    variant = VARIANTS[architecture]
    text = hf.text_config
    fields = variant.text(text, architecture)
    rope = fields["rope"]
    section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section") or variant.default_mrope_section
    if rope.kind != "default":
        raise ValueError(f"{architecture} with rope_type {rope.kind!r} is not supported (only 'default' M-RoPE)")
    rope = dataclasses.replace(rope, mrope_section=tuple(section), mrope_interleaved=variant.interleaved_mrope)
    mrope_axes(rope)  # checks the sections
    vision = variant.vision(hf.vision_config)
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"the vision merger's output width {vision.out_hidden_size} differs from the text "
                         f"hidden_size {text.hidden_size}")
    if len(vision.deepstack_indexes) > text.num_hidden_layers:
        raise ValueError(f"{len(vision.deepstack_indexes)} DeepStack feature sets for {text.num_hidden_layers} "
                         "decoder layers")
    if not 0 <= hf.image_token_id < text.vocab_size:
        raise ValueError(f"image_token_id {hf.image_token_id} is outside the vocabulary ({text.vocab_size})")
    return ModelConfig(**{
        **fields,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "rope": rope,
        "multimodal": QwenVLConfig(vision=vision, image_token_id=hf.image_token_id),
        "hf_config_json": hf_json(hf),
    })


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

_MERGERS = ("model.visual.merger", "model.visual.deepstack_merger_list.{i}")
QWEN3_VL_WEIGHTS = dataclasses.replace(
    QWEN_VL_WEIGHTS,
    renames=(
        *((f"{m}.{hf}", f"{m}.{ours}") for m in _MERGERS
          for hf, ours in (("norm", "ln_q"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2"))),
        *((f"model.visual.blocks.{{i}}.mlp.linear_{fc}", f"model.visual.blocks.{{i}}.mlp.{fc}")
          for fc in ("fc1", "fc2")),
    ),
)
_EXPERTS = "model.language_model.layers.{i}.mlp.experts"
QWEN3_VL_MOE_WEIGHTS = dataclasses.replace(
    QWEN3_VL_WEIGHTS,
    tensor_renames=((f"{_EXPERTS}.gate_up_proj", f"{_EXPERTS}.gate_up.weight"),
                    (f"{_EXPERTS}.down_proj", f"{_EXPERTS}.down_proj.weight")),
    either_layout=(f"{_EXPERTS}.gate_up", f"{_EXPERTS}.down_proj"),
    fused=(Fused(f"{_EXPERTS}.gate_up", _EXPERTS, ("gate_proj", "up_proj"),
                 lambda c: (1, (c.moe_intermediate_size, c.moe_intermediate_size)), experts=True),),
)

QWEN_VL = Family("qwen_vl", qwen_vl_config, QWEN_VL_WEIGHTS,
                 quirks="Qwen ViT (2D RoPE, window attention in 2.5) + M-RoPE; images merged at placeholders")
QWEN3_VL = Family("qwen3_vl", qwen_vl_config, QWEN3_VL_WEIGHTS,
                  quirks="Qwen ViT with resampled learned positions and DeepStack sets added after the first "
                         "decoder layers; Qwen3 text with interleaved M-RoPE")
QWEN3_VL_MOE = Family("qwen3_vl_moe", qwen_vl_config, QWEN3_VL_MOE_WEIGHTS,
                      quirks="Qwen3-VL with Qwen3-MoE text (fused [in, out] expert tensors)")
GLM4V = Family("glm4v", qwen_vl_config, GLM4V_WEIGHTS,
               quirks="GLM-4 decoder with M-RoPE on interleaved partial rotary; ViT with resampled learned "
                      "positions, downsample conv and GLU merger")
