"""Gemma, Gemma 2 and Gemma 3 text decoders.

All three: (1 + w) RMSNorm, sqrt(E) embedding scale (rounded in the weight dtype),
GeGLU. Gemma 2 adds sandwich norms, local/global layers, attention and final-logit
soft-caps and `query_pre_attn_scalar`; Gemma 3 adds q/k norm and a separate
rotary base for its local layers (and drops the attention soft-cap).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import PER_LAYER_TYPE, llama_like_fields, rope_from_params
from model_lib.registry import Family


def _gemma_fields(hf: PretrainedConfig, architecture: str, family: str, *, activation: str, **reads: Any) -> dict[str, Any]:
    """Gemma's common fields; Gemma reads its activation from `hidden_act`, Gemma 2/3 from `hidden_activation`."""
    return {
        **llama_like_fields(hf, architecture, family, attention_bias=True, **reads),
        "activation": activation,
        "norm_weight_offset": 1.0,
        "embedding_multiplier": hf.hidden_size**0.5,
    }


def gemma_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(**_gemma_fields(hf, architecture, "gemma", activation=hf.hidden_act))


def gemma2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(
        **{
            **_gemma_fields(hf, architecture, "gemma2", activation=hf.hidden_activation, windows=PER_LAYER_TYPE),
            "block_norms": "sandwich",
            "attention_scale": hf.query_pre_attn_scalar**-0.5,
            "attn_logit_softcap": hf.attn_logit_softcapping,
            "final_logit_softcap": hf.final_logit_softcapping,
        }
    )


def gemma3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("Gemma3 with use_bidirectional_attention (embedding models) is not supported")
    fields = _gemma_fields(hf, architecture, "gemma3", activation=hf.hidden_activation, windows=PER_LAYER_TYPE)
    rope = {
        kind: rope_from_params(params, head_dim=fields["head_dim"], max_position=hf.max_position_embeddings)
        for kind, params in hf.rope_parameters.items()
    }
    return ModelConfig(
        **{
            **fields,
            "block_norms": "sandwich",
            "qk_norm": "head",
            "attention_scale": hf.query_pre_attn_scalar**-0.5,
            "rope": rope["full_attention"],
            "rope_local": rope["sliding_attention"],
            # transformers' Gemma3 does not apply attn_logit_softcapping; neither do we.
            "attn_logit_softcap": None,
            "final_logit_softcap": hf.final_logit_softcapping,
        }
    )


GEMMA = Family("gemma", gemma_config, quirks="(1+w) RMSNorm, sqrt(d) embedding scale, GeGLU")
GEMMA2 = Family(
    "gemma2", gemma2_config, quirks="sandwich norms, local/global layers, attention and final-logit soft-caps"
)
GEMMA3 = Family(
    "gemma3", gemma3_config, quirks="(1+w) RMSNorm, sandwich norms, q/k norm, local/global layers with two RoPE bases, logit soft-cap"
)
