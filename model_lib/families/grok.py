"""Grok-1 (`Grok1ModelForCausalLM`, xAI's 314B MoE in hpcai-tech's PyTorch port).

Reference "own": no transformers class; the math is that of the published remote code,
`modeling_grok1.py` of hpcai-tech/grok-1 (the PyTorch port of xai-org/grok-1's JAX
`model.py`). Reproduced from it:
- token embeddings times `embedding_multiplier_scale`; logits times `output_multiplier_scale`;
  tied embeddings unless `tie_word_embeddings` is false;
- sandwich norms: x + post_attn_norm(attn(pre_attn_norm(x))), then
  x + post_moe_norm(moe(pre_moe_norm(x))); RMSNorm weights are stored as `scale`;
- attention logits `q.k * attn_output_multiplier`, soft-capped at `max_attn_value`
  (tanh), GQA, rotate-half rotary with the base fixed at 10000 (the port ignores any
  `rope_theta`), head_dim = hidden_size / heads;
- an MoE block in every layer: softmax router, top-`num_experts_per_tok`, weights NOT
  renormalised; experts `gelu(linear(x)) * linear_v(x)` -> `linear_1` (exact GELU).
The published Grok-1 code has no final-logit soft-cap; the "output" scaling is the
multiplier above.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import expert_stack, llama_like_fields, moe_fields, rope_from_params
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

ROPE_THETA = 10000.0  # hard-coded in the port's RotaryEmbedding


def grok1_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "grok1", reads_head_dim=False)
    num_experts = getattr(hf, "num_experts", None) or hf.num_local_experts
    return ModelConfig(
        **{
            **fields,
            "activation": "gelu",
            "rope": rope_from_params({"rope_theta": ROPE_THETA}, head_dim=fields["head_dim"],
                                     max_position=fields["max_position_embeddings"]),
            "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", True)),
            "block_norms": "sandwich",
            "embedding_multiplier": float(hf.embedding_multiplier_scale),
            "logit_multiplier": float(hf.output_multiplier_scale),
            "attention_scale": float(hf.attn_output_multiplier),
            "attn_logit_softcap": float(hf.max_attn_value),
        },
        **moe_fields(hf, num_experts=num_experts, moe_intermediate_size=hf.intermediate_size, norm_topk_prob=False),
    )


_LAYER = "model.layers.{i}"
_NORMS = {
    "pre_attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_moe_norm": "pre_feedforward_layernorm",
    "post_moe_norm": "post_feedforward_layernorm",
}
GROK1 = Family(
    "grok1",
    grok1_config,
    WeightMap(
        renames=(
            *((f"{_LAYER}.attn.{p}", f"{_LAYER}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *((f"{_LAYER}.{hf}", f"{_LAYER}.{ours}") for hf, ours in _NORMS.items()),
            (f"{_LAYER}.moe_block.gate", f"{_LAYER}.mlp.gate"),
        ),
        tensor_renames=(
            ("model.norm.scale", "model.norm.weight"),
            *((f"{_LAYER}.{hf}.scale", f"{_LAYER}.{hf}.weight") for hf in _NORMS),
        ),
        stacked=expert_stack(f"{_LAYER}.moe_block.experts", {"linear": "gate_proj", "linear_v": "up_proj", "linear_1": "down_proj"}),
    ),
    quirks="8 experts top-2 (softmax, not renormalised), GELU experts, attention soft-cap, sandwich norms, "
    "embedding/output multipliers (remote code, own reference)",
    remote_code=True,
)
