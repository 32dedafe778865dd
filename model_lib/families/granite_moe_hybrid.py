"""GraniteMoeHybrid (Granite 4.0): GraniteMoeShared blocks whose token mixer is, per
`layer_types`, either Granite attention or a Mamba-2 mixer (`model.layers.N.mamba.*`, our
`mixer`), with no positions at all when `position_embedding_type` is not "rope" (NoPE).
The Mamba-2 mixer takes the `mamba_*` keys and normalises with `rms_norm_eps`."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.granite_moe import GRANITE_MOE_WEIGHTS, granite_moe_config
from model_lib.families.mamba import MIXER_PARTS, dt_limit
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

LINEAR_ATTENTION = "linear_attention"  # transformers' name for a Mamba layer (it reads "mamba" as this)


def granite_moe_hybrid_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    if not hf.num_local_experts:
        raise ValueError("GraniteMoeHybrid without experts (num_local_experts=0) is not supported yet")
    config = granite_moe_config(hf, architecture)
    rope = hf.position_embedding_type == "rope"
    return config.replace(
        family="granite_moe_hybrid",
        layer_attention=tuple("mamba2" if t == LINEAR_ATTENTION else "attention" for t in hf.layer_types),
        position_embedding="rope" if rope else "none",
        rope=config.rope if rope else None,
        ssm_state_size=hf.mamba_d_state,
        ssm_intermediate_size=int(hf.mamba_expand * hf.hidden_size),
        ssm_conv_kernel=hf.mamba_d_conv,
        ssm_conv_bias=bool(hf.mamba_conv_bias),
        ssm_bias=bool(hf.mamba_proj_bias),
        ssm_activation=hf.hidden_act,
        ssm_num_heads=hf.mamba_n_heads,
        ssm_head_dim=hf.mamba_d_head,
        ssm_num_groups=hf.mamba_n_groups,
        ssm_chunk_size=hf.mamba_chunk_size,
        ssm_dt_limit=dt_limit(hf.time_step_limit),
    )


GRANITE_MOE_HYBRID = Family(
    "granite_moe_hybrid",
    granite_moe_hybrid_config,
    WeightMap(
        renames=GRANITE_MOE_WEIGHTS.renames
        + tuple((f"model.layers.{{i}}.mamba{part}", f"model.layers.{{i}}.mixer{part}") for part in ("", *(f".{m}" for m in MIXER_PARTS))),
        fused=GRANITE_MOE_WEIGHTS.fused,
    ),
    quirks="Granite 4.0: Mamba-2 or attention per layer_types, MoE plus shared MLP, NoPE",
)
