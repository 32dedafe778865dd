"""Mixtral: Mistral attention with a sparse MoE block (`block_sparse_moe`, softmax top-k,
renormalised) in every layer; experts `w1` (gate), `w3` (up), `w2` (down) stored per
expert, stacked on load. PhiMoE shares the layout with LayerNorms, biases and the
sparsemixer router."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import EVERY_LAYER, W1_W3_W2, PEFT_EXPERTS, expert_stack, llama_like_fields, moe_fields
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def mixtral_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(
        **llama_like_fields(hf, architecture, "mixtral", windows=EVERY_LAYER),
        **moe_fields(hf, num_experts=hf.num_local_experts, moe_intermediate_size=hf.intermediate_size),
    )


def phimoe_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    if hf.num_experts_per_tok != 2:
        raise ValueError(f"PhiMoE's sparsemixer routes to 2 experts; num_experts_per_tok={hf.num_experts_per_tok} is not supported")
    return ModelConfig(
        **{
            **llama_like_fields(hf, architecture, "phimoe", attention_bias=True, windows=EVERY_LAYER),
            "norm_kind": "layer",
            "norm_bias": True,
            "lm_head_bias": bool(hf.lm_head_bias),
        },
        **moe_fields(
            hf,
            num_experts=hf.num_local_experts,
            moe_intermediate_size=hf.intermediate_size,
            router_kind="sparsemixer",
            router_jitter=float(hf.router_jitter_noise),
        ),
    )


MIXTRAL_WEIGHTS = WeightMap(
    renames=(("model.layers.{i}.block_sparse_moe.gate", "model.layers.{i}.mlp.gate"),),
    stacked=expert_stack("model.layers.{i}.block_sparse_moe.experts", W1_W3_W2),
    peft_experts=PEFT_EXPERTS,
)

MIXTRAL = Family("mixtral", mixtral_config, MIXTRAL_WEIGHTS, quirks="sparse MoE (softmax top-k, per-expert w1/w2/w3), sliding window")
PHIMOE = Family(
    "phimoe",
    phimoe_config,
    MIXTRAL_WEIGHTS,
    quirks="sparsemixer top-2 router, LayerNorm, LongRoPE with short/long mscale, optional attention/LM-head biases",
)
