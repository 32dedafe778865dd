"""Mllama (`MllamaForConditionalGeneration`, Llama 3.2 Vision): config mapping and tensor names.

The text model is Llama (`text_config`, head width hidden_size / heads) with cross-attention layers; the
vision model and projector are `model_lib/vision/mllama*.py`. Checkpoints name the parts by the
transformers version that saved them: hub ones `language_model.model.*`, `language_model.lm_head`,
`vision_model.*`, `multi_modal_projector.*`; transformers 5 `model.language_model.*`,
`model.vision_model.*`, `model.multi_modal_projector.*`, `lm_head`. Both load; saving writes the
transformers 5 names.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import hf_json, llama_like_fields
from model_lib.registry import Family
from model_lib.vision.mllama import EXTRA_TOKEN_ROWS, MllamaConfig
from model_lib.vision.mllama_vision import MllamaVisionConfig
from model_lib.weight_map import IDENTITY, WeightMap


def mllama_vision_config(vision: PretrainedConfig) -> MllamaVisionConfig:
    return MllamaVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_layers=vision.num_hidden_layers,
        num_global_layers=vision.num_global_layers,
        num_heads=vision.attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        max_num_tiles=vision.max_num_tiles,
        supported_aspect_ratios=tuple(tuple(int(v) for v in r) for r in vision.supported_aspect_ratios),
        intermediate_layers=tuple(vision.intermediate_layers_indices),
        vision_output_dim=vision.vision_output_dim,
        num_channels=vision.num_channels,
        norm_eps=vision.norm_eps,
        activation=vision.hidden_act,
    )


def mllama_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    text = hf.text_config
    if getattr(hf, "tie_word_embeddings", False) or text.tie_word_embeddings:
        raise ValueError(f"{architecture} with tie_word_embeddings is not supported (its token table has "
                         f"{EXTRA_TOKEN_ROWS} rows more than the output head)")
    layers = tuple(int(i) for i in text.cross_attention_layers)
    if any(not 0 <= i < text.num_hidden_layers for i in layers):
        raise ValueError(f"cross_attention_layers {list(layers)} out of range for {text.num_hidden_layers} layers")
    image_token_id = hf.image_token_id
    if not 0 <= image_token_id < text.vocab_size + EXTRA_TOKEN_ROWS:
        raise ValueError(f"image_token_id {image_token_id} is outside the token table "
                         f"({text.vocab_size} + {EXTRA_TOKEN_ROWS} rows)")
    multimodal = MllamaConfig(vision=mllama_vision_config(hf.vision_config), image_token_id=image_token_id,
                              cross_attention_layers=layers)
    fields = llama_like_fields(text, architecture, "mllama", reads_head_dim=False)
    return ModelConfig(**{**fields, "multimodal": multimodal, "hf_config_json": hf_json(hf)})


MLLAMA_WEIGHTS = WeightMap(
    key_renames=(
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^model\.language_model\.", "model."),
        (r"^(model\.)?vision_model\.", "vision_model."),
        (r"^(model\.)?multi_modal_projector\.", "multi_modal_projector."),
    ),
    relocated=(
        ("model.language_model", "model"),
        ("model.vision_model", "vision_model"),
        ("model.multi_modal_projector", "multi_modal_projector"),
    ),
    ignored=IDENTITY.ignored,
)

MLLAMA = Family("mllama", mllama_config, MLLAMA_WEIGHTS,
                quirks="tiled vision model; images read by gated cross-attention layers (CrossKV), not placeholders")
