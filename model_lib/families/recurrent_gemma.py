"""RecurrentGemma (Griffin): per `block_types`, a recurrent block (RG-LRU, `model_lib/layers/rglru.py`)
or local attention (MQA, sliding window `attention_window_size`, rotary on `partial_rotary_factor` of
each head), each followed by a GeGLU MLP with biases of width intermediate_size / 2.

Gemma's (1 + w) RMSNorm and sqrt(E) embedding scale, except that transformers rounds sqrt(E) to
bfloat16 whatever the model dtype; o_proj always has a bias; the logits are soft-capped.
Checkpoints name a block's mixer `temporal_block` and its norms `temporal_pre_norm` /
`channel_pre_norm`, the MLP `mlp_block`, the final norm `final_norm`; those rename here.
"""

from __future__ import annotations

import jax.numpy as jnp
from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from model_lib.families.common import llama_like_fields, module_renames
from model_lib.families.mamba import DEFAULT_MAX_POSITIONS
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

RECURRENT = "linear_attention"  # transformers' `layers_block_type` name for a recurrent block


def recurrent_gemma_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    rope_type = (hf.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"RecurrentGemma with rope_type {rope_type!r} is not supported (transformers takes only 'default')")
    recurrent = [kind == RECURRENT for kind in hf.layers_block_type]
    fields = llama_like_fields(hf, architecture, "recurrent_gemma", max_position_embeddings=DEFAULT_MAX_POSITIONS,
                               attention_bias=True, partial_rotary=True)
    return ModelConfig(
        **{
            **fields,
            "intermediate_size": hf.intermediate_size // 2,
            "activation": hf.hidden_activation,
            "mlp_bias": True,
            "o_bias": True,
            "norm_weight_offset": 1.0,
            "embedding_multiplier": float(jnp.asarray(hf.hidden_size**0.5, jnp.bfloat16)),
            "final_logit_softcap": float(hf.logits_soft_cap),
            "layer_types": tuple(FULL_ATTENTION if r else SLIDING_ATTENTION for r in recurrent),
            "sliding_window": hf.attention_window_size,
            "layer_attention": tuple("rglru" if r else "attention" for r in recurrent),
            "ssm_intermediate_size": hf.lru_width,
            "ssm_conv_kernel": hf.conv1d_width,
            "ssm_num_heads": hf.num_attention_heads,
        }
    )


ATTENTION_PARTS = {f"temporal_block.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
RECURRENT_PARTS = {f"temporal_block.{p}": f"mixer.{p}" for p in ("linear_x", "linear_y", "linear_out", "conv_1d", "rg_lru")}
MLP_PARTS = {f"mlp_block{p}": f"mlp{p}" for p in ("", ".gate_proj", ".up_proj", ".down_proj")}

RECURRENT_GEMMA = Family(
    "recurrent_gemma",
    recurrent_gemma_config,
    WeightMap(
        renames=module_renames(
            {"model.final_norm": "model.norm"},
            "model.layers.{i}",
            {"temporal_pre_norm": "input_layernorm", "channel_pre_norm": "post_attention_layernorm",
             **ATTENTION_PARTS, **RECURRENT_PARTS, **MLP_PARTS},
        ),
    ),
    quirks="Griffin: RG-LRU recurrent blocks (conv1d + gated linear recurrence) and local MQA attention, "
    "partial rotary, logit soft-cap",
)
