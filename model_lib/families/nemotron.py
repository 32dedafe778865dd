"""Nemotron-3/4, Minitron: LayerNorm1p (weights stored around 0, applied as 1 + w,
with bias), squared-ReLU plain MLP, partial rotary."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields
from model_lib.registry import Family


def nemotron_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(
        **{
            **llama_like_fields(hf, architecture, "nemotron", attention_bias=True, mlp_bias=True, partial_rotary=True),
            "norm_kind": "layer",
            "norm_bias": True,
            "norm_weight_offset": 1.0,
            "norm_eps": hf.norm_eps,
            "mlp_gated": False,
        }
    )


NEMOTRON = Family("nemotron", nemotron_config, quirks="LayerNorm1p, squared-ReLU MLP, partial rotary")
