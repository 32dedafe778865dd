"""StarCoder2: Llama attention with LayerNorm, biases (`use_bias`) and a plain GELU
MLP named `c_fc` / `c_proj`; sliding window."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import EVERY_LAYER, llama_like_fields
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def starcoder2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(
        **{
            **llama_like_fields(hf, architecture, "starcoder2", windows=EVERY_LAYER),
            "norm_kind": "layer",
            "norm_bias": True,
            "norm_eps": hf.norm_epsilon,
            "qkv_bias": hf.use_bias,
            "o_bias": hf.use_bias,
            "mlp_bias": hf.use_bias,
            "mlp_gated": False,
        }
    )


STARCODER2 = Family(
    "starcoder2",
    starcoder2_config,
    WeightMap(
        renames=(
            ("model.layers.{i}.mlp.c_fc", "model.layers.{i}.mlp.up_proj"),
            ("model.layers.{i}.mlp.c_proj", "model.layers.{i}.mlp.down_proj"),
        )
    ),
    quirks="LayerNorm, biases, plain GELU MLP, sliding window",
)
