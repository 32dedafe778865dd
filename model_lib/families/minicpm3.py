"""MiniCPM3: Llama blocks with multi-head latent attention (`model_lib/layers/mla.py`),
LongRoPE on the rope part of each head, and MiniCPM's muP multipliers: embeddings
times `scale_emb`, each residual branch times `scale_depth / sqrt(num_layers)`,
hidden states divided by `hidden_size / dim_model_base` before the LM head (a
logit multiplier, as the head has no bias). Loads by identity."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields, mla_fields
from model_lib.registry import Family


def minicpm3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # transformers sets hf.head_dim = qk_rope_head_dim, so the rotary built here spans the rope part.
    fields = llama_like_fields(hf, architecture, "minicpm3", attention_bias=True, mlp_bias=True)
    return ModelConfig(
        **{
            **fields,
            **mla_fields(hf, fields["rope"]),
            "embedding_multiplier": float(hf.scale_emb),
            "residual_multiplier": hf.scale_depth / math.sqrt(hf.num_hidden_layers),
            "logit_multiplier": hf.dim_model_base / hf.hidden_size,
        }
    )


MINICPM3 = Family(
    "minicpm3",
    minicpm3_config,
    quirks="MLA (low-rank q and kv latent, shared rope key), LongRoPE, embedding/residual/logit multipliers",
)
