"""GLM-4 (GlmForCausalLM) and GLM-4-0414 (Glm4ForCausalLM): partial interleaved
rotary, qkv bias, fused `gate_up_proj`; Glm4 adds norms after attention and MLP.

Glm4's norm names map onto our sandwich block: its `post_self_attn_layernorm`
is our `post_attention_layernorm`, its `post_attention_layernorm` (before the
MLP) our `pre_feedforward_layernorm`, its `post_mlp_layernorm` our
`post_feedforward_layernorm`.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import gate_up_fused, llama_like_fields
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def glm_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # attention_bias puts biases on q/k/v only.
    fields = llama_like_fields(hf, architecture, "glm", attention_bias=True, partial_rotary=True)
    return ModelConfig(**{**fields, "o_bias": False, "rope": dataclasses.replace(fields["rope"], interleaved=True)})


def glm4_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return glm_config(hf, architecture).replace(family="glm4", block_norms="sandwich")


GLM = Family("glm", glm_config, WeightMap(fused=(gate_up_fused(),)), quirks="partial interleaved rotary, qkv bias, fused gate_up_proj")
GLM4 = Family(
    "glm4",
    glm4_config,
    WeightMap(
        renames=(
            ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.pre_feedforward_layernorm"),
            ("model.layers.{i}.post_self_attn_layernorm", "model.layers.{i}.post_attention_layernorm"),
            ("model.layers.{i}.post_mlp_layernorm", "model.layers.{i}.post_feedforward_layernorm"),
        ),
        fused=(gate_up_fused(),),
    ),
    quirks="Glm plus norms after attention and MLP",
)
