"""Phi-1 / Phi-1.5 / Phi-2: one LayerNorm feeding attention and MLP in parallel, partial
rotary (halves layout), biases everywhere, a plain `fc1`/`fc2` MLP, optional LayerNorm
of q and k per head, and an lm_head with a bias. Llama's module tree under other names."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields, module_renames, refuse_tied_head_bias
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def phi_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    refuse_tied_head_bias(hf, "Phi")
    fields = llama_like_fields(hf, architecture, "phi", partial_rotary=True)
    return ModelConfig(
        **{
            **fields,
            "norm_kind": "layer",
            "norm_eps": hf.layer_norm_eps,
            "norm_bias": True,
            "parallel_block": "shared_norm",
            "qk_norm": "head" if hf.qk_layernorm else "none",
            "qkv_bias": True,
            "o_bias": True,
            "mlp_gated": False,
            "mlp_bias": True,
            "lm_head_bias": True,
        }
    )


PHI = Family(
    "phi",
    phi_config,
    WeightMap(
        renames=module_renames(
            {"model.final_layernorm": "model.norm"},
            "model.layers.{i}",
            {
                "self_attn.dense": "self_attn.o_proj",
                "self_attn.q_layernorm": "self_attn.q_norm",
                "self_attn.k_layernorm": "self_attn.k_norm",
                "mlp.fc1": "mlp.up_proj",
                "mlp.fc2": "mlp.down_proj",
            },
        )
    ),
    quirks="parallel attention + MLP under one LayerNorm, partial rotary, optional q/k LayerNorm, lm_head bias",
)
