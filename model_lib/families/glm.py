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


def glm4_norm_renames(layers: str = "model.layers") -> tuple[tuple[str, str], ...]:
    """Glm4's block norm names -> our sandwich block's, for the decoder layers under `layers`."""
    return tuple((f"{layers}.{{i}}.{hf}", f"{layers}.{{i}}.{ours}") for hf, ours in (
        ("post_attention_layernorm", "pre_feedforward_layernorm"),
        ("post_self_attn_layernorm", "post_attention_layernorm"),
        ("post_mlp_layernorm", "post_feedforward_layernorm"),
    ))


GLM = Family("glm", glm_config, WeightMap(fused=(gate_up_fused(),)), quirks="partial interleaved rotary, qkv bias, fused gate_up_proj")
GLM4 = Family(
    "glm4",
    glm4_config,
    WeightMap(renames=glm4_norm_renames(), fused=(gate_up_fused(),)),
    quirks="Glm plus norms after attention and MLP",
)
