"""Qwen2-MoE and Qwen3-MoE: Qwen2 / Qwen3 attention with MoE MLPs (softmax top-k,
`norm_topk_prob`); dense MLPs on `mlp_only_layers` and off the `decoder_sparse_step`
grid. Qwen2-MoE adds a shared expert behind a sigmoid gate. Loads by identity but
for the per-expert tensors, stacked on load."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import EVERY_LAYER, GATE_UP_DOWN, PER_LAYER_TYPE, PEFT_EXPERTS, expert_stack, llama_like_fields, moe_fields
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def qwen_moe_fields(hf: PretrainedConfig, norm_topk_prob: bool | None = None) -> dict[str, Any]:
    """`norm_topk_prob`: given where the class fixes it (Qwen3-VL-MoE), else the config's."""
    sparse = [
        i not in (hf.mlp_only_layers or ()) and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
        for i in range(hf.num_hidden_layers)
    ]
    return moe_fields(
        hf,
        num_experts=hf.num_experts,
        moe_intermediate_size=hf.moe_intermediate_size,
        moe_layers=sparse,
        norm_topk_prob=bool(hf.norm_topk_prob if norm_topk_prob is None else norm_topk_prob),
    )


def qwen2_moe_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "qwen2_moe", windows=PER_LAYER_TYPE)
    return ModelConfig(
        **{**fields, "qkv_bias": bool(getattr(hf, "qkv_bias", True)), "o_bias": False},
        **qwen_moe_fields(hf),
        shared_expert_size=hf.shared_expert_intermediate_size,
        shared_expert_gate=True,
    )


def qwen3_moe_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # Qwen3-MoE slides every layer (its config nulls sliding_window unless use_sliding_window).
    fields = llama_like_fields(hf, architecture, "qwen3_moe", attention_bias=True, windows=EVERY_LAYER)
    return ModelConfig(**{**fields, "qk_norm": "head"}, **qwen_moe_fields(hf))


QWEN_MOE_WEIGHTS = WeightMap(stacked=expert_stack("model.layers.{i}.mlp.experts", GATE_UP_DOWN), peft_experts=PEFT_EXPERTS)

QWEN2_MOE = Family(
    "qwen2_moe", qwen2_moe_config, QWEN_MOE_WEIGHTS, quirks="MoE with sigmoid-gated shared expert, dense layers by sparse step"
)
QWEN3_MOE = Family("qwen3_moe", qwen3_moe_config, QWEN_MOE_WEIGHTS, quirks="MoE (norm_topk_prob), q/k RMSNorm")
