"""GPT-NeoX / Pythia: LayerNorm, biases, partial rotary (`rotary_pct` of each head, halves
layout), the attention fused into `query_key_value` as `[q_h | k_h | v_h]` per head, and
`use_parallel_residual` choosing x + attn(n1(x)) + mlp(n2(x)) or the sequential block.
Checkpoints name the head `embed_out` and may carry the old causal-mask buffers."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import classic_fields, module_renames, qkv_fused, qkv_per_kv_group, rope_from_params
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def gpt_neox_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = classic_fields(
        hf,
        architecture,
        "gpt_neox",
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=hf.layer_norm_eps,
        activation=hf.hidden_act,
    )
    # transformers sizes the rotary by `head_dim` when the config has one (the attention
    # heads stay hidden_size / heads): rotary_dim = head_dim * partial_rotary_factor.
    rotary_head_dim = getattr(hf, "head_dim", None) or fields["head_dim"]
    rope = rope_from_params(hf.rope_parameters, head_dim=rotary_head_dim, max_position=hf.max_position_embeddings, partial_rotary=True)
    if rope.rotary_dim > fields["head_dim"]:
        raise ValueError(f"GPT-NeoX with head_dim={hf.head_dim} rotates {rope.rotary_dim} features of {fields['head_dim']}-wide heads")
    return ModelConfig(
        **{
            **fields,
            "rope": rope,
            "parallel_block": "two_norms" if hf.use_parallel_residual else "none",
            "qkv_bias": hf.attention_bias,
            "o_bias": hf.attention_bias,
            "mlp_bias": True,
        }
    )


GPT_NEOX = Family(
    "gpt_neox",
    gpt_neox_config,
    WeightMap(
        renames=module_renames(
            {"gpt_neox.embed_in": "model.embed_tokens", "gpt_neox.final_layer_norm": "model.norm", "embed_out": "lm_head"},
            "gpt_neox.layers.{i}",
            {
                "input_layernorm": "input_layernorm",
                "post_attention_layernorm": "post_attention_layernorm",
                "attention.dense": "self_attn.o_proj",
                "mlp.dense_h_to_4h": "mlp.up_proj",
                "mlp.dense_4h_to_h": "mlp.down_proj",
            },
        ),
        fused=(
            qkv_fused("gpt_neox.layers.{i}.attention.query_key_value", qkv_per_kv_group),
        ),
        ignored=(r".*\.attention\.(masked_)?bias", r".*\.rotary_emb\.inv_freq"),
    ),
    quirks="parallel (two norms) or sequential residual, partial rotary, fused per-head query_key_value",
)
