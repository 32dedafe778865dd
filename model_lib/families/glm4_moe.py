"""Glm4-MoE (GLM-4.5): GLM-4 attention (partial rotary, optional q/k norm, qkv bias) with
dense MLPs on the first `first_k_dense_replace` layers and MoE elsewhere: sigmoid router
with `e_score_correction_bias`, group-limited top-k, routed scaling factor, and
`n_shared_experts` always-on experts (one MLP). The multi-token-prediction block(s) that
checkpoints carry past the last layer (`num_nextn_predict_layers`, `model.layers.{N + k}`, in
DeepSeek-V3's layout) load onto `CausalLM.mtp` for speculative decoding (`method: "mtp"`); a
checkpoint without them loads without."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import SHARED_EXPERTS_WEIGHTS, llama_like_fields, moe_fields, with_mtp_blocks
from model_lib.registry import Family


def glm4_moe_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "glm4_moe", attention_bias=True, partial_rotary=True)
    return ModelConfig(
        **{**fields, "o_bias": False, "qk_norm": "head" if hf.use_qk_norm else "none"},
        **moe_fields(
            hf,
            num_experts=hf.n_routed_experts,
            moe_intermediate_size=hf.moe_intermediate_size,
            moe_layers=[i >= hf.first_k_dense_replace for i in range(hf.num_hidden_layers)],
            router_kind="sigmoid",
            norm_topk_prob=bool(hf.norm_topk_prob),
            routed_scaling_factor=float(hf.routed_scaling_factor),
            moe_num_groups=hf.n_group,
            moe_topk_group=hf.topk_group,
            shared_expert_size=hf.moe_intermediate_size * hf.n_shared_experts,
        ),
        num_mtp_layers=hf.num_nextn_predict_layers or 0,
    )


GLM4_MOE = Family(
    "glm4_moe",
    glm4_moe_config,
    SHARED_EXPERTS_WEIGHTS,
    quirks="sigmoid router with correction bias and expert groups, routed scaling, shared experts, first-k dense layers, "
    "MTP block kept",
    weight_map_for=with_mtp_blocks,
)
