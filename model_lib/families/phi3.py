"""Phi-3 / Phi-3.5 / Phi-4(-mini): Llama math with fused `qkv_proj` and `gate_up_proj`,
LongRoPE and partial rotary. The fused tensors split on load and join on save."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import EVERY_LAYER, gate_up_fused, llama_like_fields, qkv_fused
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def phi3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(**llama_like_fields(hf, architecture, "phi3", windows=EVERY_LAYER, partial_rotary=True))


PHI3 = Family(
    "phi3",
    phi3_config,
    WeightMap(
        fused=(
            qkv_fused("model.layers.{i}.self_attn.qkv_proj"),
            gate_up_fused(),
        )
    ),
    quirks="fused qkv_proj and gate_up_proj, LongRoPE, partial rotary, sliding window",
)
