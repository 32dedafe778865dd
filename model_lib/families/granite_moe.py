"""GraniteMoe and GraniteMoeShared: Granite's multipliers with an MoE block in every
layer (top-k of the logits then softmax). Experts come fused: `input_linear [X, 2I, E]`
holds [gate | up], `output_linear [X, E, I]` the down projection. GraniteMoeShared adds
an always-on `shared_mlp` with the same fused layout."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import moe_fields
from model_lib.families.llama import granite_config
from model_lib.registry import Family
from model_lib.weight_map import Fused, WeightMap


def granite_moe_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return granite_config(hf, architecture, mlp_bias=False).replace(
        family="granite_moe",
        shared_expert_size=getattr(hf, "shared_intermediate_size", 0) or 0,
        **moe_fields(hf, num_experts=hf.num_local_experts, moe_intermediate_size=hf.intermediate_size),
    )


GRANITE_MOE_WEIGHTS = WeightMap(
    renames=(
        ("model.layers.{i}.block_sparse_moe.router.layer", "model.layers.{i}.mlp.gate"),
        ("model.layers.{i}.block_sparse_moe.output_linear", "model.layers.{i}.mlp.experts.down_proj"),
        ("model.layers.{i}.shared_mlp.output_linear", "model.layers.{i}.mlp.shared_expert.down_proj"),
    ),
    fused=(
        Fused(
            "model.layers.{i}.block_sparse_moe.input_linear",
            "model.layers.{i}.mlp.experts",
            ("gate_proj", "up_proj"),
            lambda c: (1, (c.moe_intermediate_size, c.moe_intermediate_size)),
            experts=True,
        ),
        Fused(
            "model.layers.{i}.shared_mlp.input_linear",
            "model.layers.{i}.mlp.shared_expert",
            ("gate_proj", "up_proj"),
            lambda c: (1, (c.shared_expert_size, c.shared_expert_size)),
        ),
    ),
)

GRANITE_MOE = Family(
    "granite_moe", granite_moe_config, GRANITE_MOE_WEIGHTS, quirks="Granite multipliers, MoE with fused [X, 2I, E] expert tensors"
)
GRANITE_MOE_SHARED = Family(
    "granite_moe_shared", granite_moe_config, GRANITE_MOE_WEIGHTS, quirks="GraniteMoe plus a fused shared MLP"
)
