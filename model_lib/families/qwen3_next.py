"""Qwen3-Next: per `layer_types`, Gated DeltaNet linear attention (`linear_attn`, our `mixer`;
`model_lib/layers/gated_delta.py`) or gated full attention (q_proj also yields a per-head output
gate, q/k RMSNorm, partial rotary), each followed by Qwen2-MoE's sparse MoE with a sigmoid-gated
shared expert (dense MLPs on `mlp_only_layers` and off the `decoder_sparse_step` grid).

Every RMSNorm but the DeltaNet's gated one scales by (1 + w), as Gemma's. The multi-token-prediction
block of the published checkpoints (`mtp.*`) is not loaded (logged): speculative decoding with it
is not wired here. Numerical note: the gated delta rule is evaluated in float32 whatever the
parameter dtype, as transformers' torch path does.
"""

from __future__ import annotations

import logging

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields
from model_lib.families.qwen_moe import QWEN_MOE_WEIGHTS, qwen_moe_fields
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

logger = logging.getLogger(__name__)

LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"
GATED_DELTA_CHUNK = 64  # transformers' chunk length; any length gives the same result
DELTANET_PARTS = ("", ".conv1d", ".in_proj_qkvz", ".in_proj_ba", ".norm", ".out_proj")


def qwen3_next_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    unknown = sorted(set(hf.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION})
    if unknown:
        raise ValueError(f"Qwen3-Next layer_types {unknown} are not supported (only {LINEAR_ATTENTION}, {FULL_ATTENTION})")
    key_heads, value_heads = hf.linear_num_key_heads, hf.linear_num_value_heads
    if key_heads < 1 or value_heads % key_heads:
        raise ValueError(f"linear_num_value_heads ({value_heads}) must be a multiple of linear_num_key_heads ({key_heads})")
    if getattr(hf, "mtp_num_hidden_layers", 0):
        logger.info("Qwen3-Next: the checkpoint's %d MTP layer(s) (mtp.*) are not loaded", hf.mtp_num_hidden_layers)
    fields = llama_like_fields(hf, architecture, "qwen3_next", attention_bias=True, partial_rotary=True)
    return ModelConfig(
        **{**fields, "qk_norm": "head", "norm_weight_offset": 1.0},
        **qwen_moe_fields(hf),
        shared_expert_size=hf.shared_expert_intermediate_size,
        shared_expert_gate=True,
        attention_output_gate=True,
        layer_attention=tuple("gated_delta" if t == LINEAR_ATTENTION else "attention" for t in hf.layer_types),
        ssm_num_groups=key_heads,
        ssm_state_size=hf.linear_key_head_dim,
        ssm_num_heads=value_heads,
        ssm_head_dim=hf.linear_value_head_dim,
        ssm_intermediate_size=value_heads * hf.linear_value_head_dim,
        ssm_conv_kernel=hf.linear_conv_kernel_dim,
        ssm_conv_bias=False,
        ssm_activation=hf.hidden_act,
        ssm_chunk_size=GATED_DELTA_CHUNK,
    )


QWEN3_NEXT = Family(
    "qwen3_next",
    qwen3_next_config,
    WeightMap(
        renames=tuple((f"model.layers.{{i}}.linear_attn{p}", f"model.layers.{{i}}.mixer{p}") for p in DELTANET_PARTS),
        stacked=QWEN_MOE_WEIGHTS.stacked,
        peft_experts=QWEN_MOE_WEIGHTS.peft_experts,
        ignored=(r".*\.rotary_emb\.inv_freq", r"mtp\..*"),
    ),
    quirks="Gated DeltaNet or gated attention per layer_types, (1 + w) norms, partial rotary, MoE + gated shared expert",
)
