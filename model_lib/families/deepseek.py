"""DeepSeek-V2 / V2.5 / V2-Lite, DeepSeek-MoE style configs, and DeepSeek-V3 / R1.

Multi-head latent attention (`model_lib/layers/mla.py`, shared with MiniCPM3): q through
a rank-`q_lora_rank` bottleneck or one plain `q_proj` (V2-Lite), K/V from a
rank-`kv_lora_rank` latent, rotary on the `qk_rope_head_dim` part of each head, laid
out in interleaved pairs (always in V2, per `rope_interleave` in V3), YaRN with
DeepSeek's `mscale` / `mscale_all_dim` (the softmax scale takes mscale(all_dim)^2).
The first `first_k_dense_replace` layers keep a dense MLP, every later one is MoE with
`n_shared_experts` always-on experts (one MLP of `n_shared_experts` x the expert width):
- V2 routers (`topk_method`): `greedy`, softmax top-k; `group_limited_greedy`, the
  same within the `topk_group` of `n_group` groups whose best expert scores highest.
  Neither renormalises (transformers' V2 ignores `norm_topk_prob`); both scale by
  `routed_scaling_factor`.
- V3 router (`noaux_tc`, whatever `topk_method` says): sigmoid scores, choice by score +
  `e_score_correction_bias` within the best `topk_group` of `n_group` groups (sum of
  their best two), weights the plain scores, renormalised when `norm_topk_prob`, scaled
  by `routed_scaling_factor`.
`moe_layer_freq` is ignored, as transformers does. V3 checkpoints may carry the MTP
block(s) (`num_nextn_predict_layers`) as `model.layers.{num_hidden_layers + k}`: they
load onto `CausalLM.mtp` (kept for speculative decoding, not run; their copies of the
embeddings and head are skipped); a checkpoint without them (transformers' own saves)
loads without. FP8 block-scaled checkpoints
(`weight_scale_inv`) load dequantized through `model_lib.quantization.checkpoints`.
Experts are stored per expert and stacked on load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import (
    SHARED_EXPERTS_WEIGHTS,
    llama_like_fields,
    mla_fields,
    moe_fields,
    with_mtp_blocks,
)
from model_lib.registry import Family

V2_ROUTERS = ("greedy", "group_limited_greedy")


def _deepseek_fields(hf: PretrainedConfig, architecture: str, family: str, *, mlp_bias: bool, interleaved: bool,
                     **router: Any) -> dict[str, Any]:
    if not hf.num_experts_per_tok:
        raise ValueError(f"{family} needs num_experts_per_tok (got {hf.num_experts_per_tok!r})")
    fields = llama_like_fields(hf, architecture, family, attention_bias=True, mlp_bias=mlp_bias)
    # transformers sets head_dim = qk_rope_head_dim, so the rotary built here spans the rope part.
    rope = dataclasses.replace(fields["rope"], interleaved=interleaved)
    first_dense = hf.first_k_dense_replace or 0
    return {
        **fields,
        **mla_fields(hf, rope),
        "rope": rope,
        **moe_fields(
            hf,
            num_experts=hf.n_routed_experts,
            moe_intermediate_size=hf.moe_intermediate_size,
            moe_layers=[i >= first_dense for i in range(hf.num_hidden_layers)],
            routed_scaling_factor=float(hf.routed_scaling_factor),
            shared_expert_size=hf.moe_intermediate_size * (hf.n_shared_experts or 0),
            **router,
        ),
    }


def deepseek_v2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    method = hf.topk_method
    if method not in V2_ROUTERS:
        raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported; expected one of {V2_ROUTERS}")
    grouped = method == "group_limited_greedy"
    if grouped and not (hf.n_group and hf.topk_group):
        raise ValueError(
            f"topk_method 'group_limited_greedy' needs n_group and topk_group (got {hf.n_group}, {hf.topk_group})"
        )
    return ModelConfig(
        **_deepseek_fields(
            hf,
            architecture,
            "deepseek_v2",
            mlp_bias=True,
            interleaved=True,
            router_kind="softmax",
            norm_topk_prob=False,
            moe_num_groups=hf.n_group if grouped else 1,
            moe_topk_group=hf.topk_group if grouped else 1,
        )
    )


def deepseek_v3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    if not (hf.n_group and hf.topk_group):
        raise ValueError(f"DeepSeek-V3 needs n_group and topk_group (got {hf.n_group}, {hf.topk_group})")
    return ModelConfig(
        **_deepseek_fields(
            hf,
            architecture,
            "deepseek_v3",
            mlp_bias=False,
            interleaved=bool(hf.rope_interleave),
            router_kind="sigmoid",
            norm_topk_prob=bool(hf.norm_topk_prob),
            moe_num_groups=hf.n_group,
            moe_topk_group=hf.topk_group,
        ),
        num_mtp_layers=hf.num_mtp_layers or 0,
    )


DEEPSEEK_V2 = Family(
    "deepseek_v2",
    deepseek_v2_config,
    SHARED_EXPERTS_WEIGHTS,
    quirks="MLA (optional q low rank, interleaved rope, YaRN mscale), greedy / group-limited softmax routers, "
    "shared experts, first-k dense layers",
)
DEEPSEEK_V3 = Family(
    "deepseek_v3",
    deepseek_v3_config,
    SHARED_EXPERTS_WEIGHTS,
    quirks="MLA, sigmoid router with correction bias and expert groups, routed scaling, shared experts, "
    "first-k dense layers, MTP block kept, FP8 block-scaled weights",
    weight_map_for=with_mtp_blocks,
)
