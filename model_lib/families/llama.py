"""Llama and the variants that differ from it only in config: Mistral, Qwen2, Qwen3, Granite.

All load by identity (HF names are ours); each variant is a few fields.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import EVERY_LAYER, PER_LAYER_TYPE, llama_like_fields
from model_lib.registry import Family


def llama_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(**llama_like_fields(hf, architecture, "llama", attention_bias=True, mlp_bias=True))


def mistral_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # No biases; `sliding_window` (when set) on every layer.
    return ModelConfig(**llama_like_fields(hf, architecture, "mistral", windows=EVERY_LAYER))


def qwen2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "qwen2", windows=PER_LAYER_TYPE)
    return ModelConfig(**{**fields, "qkv_bias": True, "o_bias": False})


def qwen3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "qwen3", attention_bias=True, windows=PER_LAYER_TYPE)
    return ModelConfig(**{**fields, "qk_norm": "head"})


def granite_config(hf: PretrainedConfig, architecture: str, *, mlp_bias: bool = True) -> ModelConfig:
    """Granite's multipliers; `mlp_bias=False` for the MoE variants, whose classes ignore it."""
    return ModelConfig(
        **{
            **llama_like_fields(hf, architecture, "granite", attention_bias=True, mlp_bias=mlp_bias),
            "embedding_multiplier": hf.embedding_multiplier,
            "residual_multiplier": hf.residual_multiplier,
            "attention_scale": hf.attention_multiplier,
            "logit_multiplier": 1.0 / hf.logits_scaling,
        }
    )


LLAMA = Family("llama", llama_config, quirks="GQA/MQA, llama3/linear/dynamic/yarn RoPE, tied embeddings, optional biases")
MISTRAL = Family("mistral", mistral_config, quirks="sliding window")
QWEN2 = Family("qwen2", qwen2_config, quirks="qkv bias, sliding window above max_window_layers")
QWEN3 = Family("qwen3", qwen3_config, quirks="per-head q/k RMSNorm")
GRANITE = Family("granite", granite_config, quirks="embedding/residual/attention/logit multipliers")
