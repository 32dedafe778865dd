"""Gemma 3 text decoder: (1 + w) RMSNorm, sqrt(E) embedding scale, GeGLU, sandwich
norms, q/k norm, 5:1 local/global layers with a separate local rotary base."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields, rope_from_params
from model_lib.registry import Family


def gemma3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("Gemma3 with use_bidirectional_attention (embedding models) is not supported")
    fields = llama_like_fields(hf, architecture, "gemma3")
    rope = {
        kind: rope_from_params(params, head_dim=fields["head_dim"], max_position=hf.max_position_embeddings)
        for kind, params in hf.rope_parameters.items()
    }
    return ModelConfig(
        **{
            **fields,
            "activation": hf.hidden_activation,
            "norm_weight_offset": 1.0,
            "block_norms": "sandwich",
            "qk_norm": "head",
            "embedding_multiplier": hf.hidden_size**0.5,
            "attention_scale": hf.query_pre_attn_scalar**-0.5,
            "rope": rope["full_attention"],
            "rope_local": rope["sliding_attention"],
            # transformers' Gemma3 does not apply attn_logit_softcapping; neither do we.
            "attn_logit_softcap": None,
            "final_logit_softcap": hf.final_logit_softcapping,
        }
    )


GEMMA3 = Family(
    "gemma3", gemma3_config, quirks="(1+w) RMSNorm, sandwich norms, q/k norm, local/global layers with two RoPE bases, logit soft-cap"
)
