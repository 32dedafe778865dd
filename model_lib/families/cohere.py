"""Command-R (CohereForCausalLM): parallel attention + MLP on one LayerNorm (no
bias), interleaved rotary, optional per-head q/k LayerNorm, logit scale, tied
embeddings."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields
from model_lib.registry import Family


def cohere_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "cohere", attention_bias=True)
    return ModelConfig(
        **{
            **fields,
            "norm_kind": "layer",
            "norm_eps": hf.layer_norm_eps,
            "parallel_block": "shared_norm",
            "qk_norm": "per_head" if hf.use_qk_norm else "none",
            "rope": dataclasses.replace(fields["rope"], interleaved=True),
            "logit_multiplier": hf.logit_scale,
        }
    )


COHERE = Family("cohere", cohere_config, quirks="parallel block, LayerNorm, interleaved rotary, per-head q/k norm, logit scale")
