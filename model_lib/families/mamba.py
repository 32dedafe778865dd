"""Mamba and Mamba-2: every block is RMSNorm -> state-space mixer -> residual, with no MLP,
no attention and no positions (`model_lib/layers/ssm.py`).

Checkpoints name the stack `backbone.` (`backbone.embeddings`, `backbone.layers.N.norm`,
`backbone.layers.N.mixer.*`, `backbone.norm_f`); older state-spaces checkpoints say
`backbone.embedding`, which transformers also accepts. The mixer's tensors load by identity.
Numerical caveat: transformers keeps the residual stream in float32 (`residual_in_fp32`);
ours has the parameter dtype, which differs only under bfloat16.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, ModelConfig
from model_lib.families.common import hf_json, module_renames, token_ids
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

# Recurrent models have no position table; like vLLM, serve 2048 tokens unless told otherwise.
DEFAULT_MAX_POSITIONS = 2048


def _ssm_fields(hf: PretrainedConfig, architecture: str, family: str, kind: str, intermediate: int) -> dict[str, Any]:
    layers = hf.num_hidden_layers
    rank = hf.time_step_rank
    return dict(
        architecture=architecture,
        family=family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=1,  # no attention: the head fields are unused
        num_kv_heads=1,
        head_dim=hf.hidden_size,
        max_position_embeddings=DEFAULT_MAX_POSITIONS,
        position_embedding="none",
        rope=None,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_kind="rms",
        norm_eps=hf.layer_norm_epsilon,
        layer_types=(FULL_ATTENTION,) * layers,
        layer_attention=(kind,) * layers,
        layer_mlp=("none",) * layers,
        ssm_state_size=hf.state_size,
        ssm_intermediate_size=intermediate,
        ssm_conv_kernel=hf.conv_kernel,
        ssm_conv_bias=bool(hf.use_conv_bias),
        ssm_bias=bool(hf.use_bias),
        ssm_activation=hf.hidden_act,
        ssm_time_step_rank=math.ceil(hf.hidden_size / 16) if rank == "auto" else int(rank),
        initializer_range=getattr(hf, "initializer_range", 0.02),
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


def mamba_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(**_ssm_fields(hf, architecture, "mamba", "mamba", int(hf.intermediate_size)))


def dt_limit(limit: Any) -> tuple[float, float]:
    """A config's `time_step_limit` (None: unclamped)."""
    low, high = limit if limit is not None else (0.0, float("inf"))
    return float(low), float(high)


def mamba2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    fields = _ssm_fields(hf, architecture, "mamba2", "mamba2", int(hf.expand * hf.hidden_size))
    return ModelConfig(
        **fields,
        ssm_num_heads=hf.num_heads,
        ssm_head_dim=hf.head_dim,
        ssm_num_groups=hf.n_groups,
        ssm_chunk_size=hf.chunk_size,
        ssm_dt_limit=dt_limit(hf.time_step_limit),
    )


MIXER_PARTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "norm", "out_proj")
MIXER_MODULES = ("mixer", *(f"mixer.{m}" for m in MIXER_PARTS))
BACKBONE = WeightMap(
    renames=module_renames(
        {"backbone.embeddings": "model.embed_tokens", "backbone.embedding": "model.embed_tokens", "backbone.norm_f": "model.norm"},
        "backbone.layers.{i}",
        {"norm": "input_layernorm", **{m: m for m in MIXER_MODULES}},
    ),
)

MAMBA = Family(
    "mamba",
    mamba_config,
    BACKBONE,
    quirks="selective-scan state-space mixer (conv1d + per-channel scan), no attention, recurrent serving state",
)
MAMBA2 = Family(
    "mamba2",
    mamba2_config,
    BACKBONE,
    quirks="SSD state-space mixer (chunked scan, per-head decay, grouped B/C, gated RMSNorm), no attention",
)
