"""EXAONE 4.0: post-norm blocks (norm after each sublayer, none before), per-head
q/k RMSNorm, and hybrid attention whose global layers use no rotary (NoPE)."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import PER_LAYER_TYPE, llama_like_fields
from model_lib.registry import Family


def exaone4_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = llama_like_fields(hf, architecture, "exaone4", windows=PER_LAYER_TYPE)
    # With a sliding window configured, only the sliding layers rotate (even if none slide).
    hybrid = hf.sliding_window is not None
    return ModelConfig(
        **{
            **fields,
            "block_norms": "post",
            "qk_norm": "head",
            "rope": None if hybrid else fields["rope"],
            "rope_local": fields["rope"] if hybrid else None,
        }
    )


EXAONE4 = Family("exaone4", exaone4_config, quirks="post-norm blocks, q/k norm, local/global layers with NoPE global layers")
