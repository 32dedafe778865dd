"""gpt-oss: attention with biases and per-head sinks, alternating sliding/full layers,
YaRN, and an MoE MLP in every layer: a biased router (top-k of the logits, softmax over
them), experts with biases and the clamped SwiGLU `(clip(up) + 1) * g * sigmoid(alpha g)`.
The expert tensors are stored `[X, in, out]` under bare names (`experts.gate_up_proj`,
gate and up interleaved column by column), which the weight map renames and splits."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import PER_LAYER_TYPE, llama_like_fields, moe_fields
from model_lib.registry import Family
from model_lib.weight_map import Fused, WeightMap


def gpt_oss_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return ModelConfig(
        **{**llama_like_fields(hf, architecture, "gpt_oss", attention_bias=True, windows=PER_LAYER_TYPE), "attention_sinks": True},
        **moe_fields(
            hf,
            num_experts=hf.num_local_experts,
            moe_intermediate_size=hf.intermediate_size,
            router_bias=True,
            expert_bias=True,
            expert_swiglu_limit=float(hf.swiglu_limit),
            expert_swiglu_alpha=float(hf.swiglu_alpha),
        ),
    )


_EXPERTS = "model.layers.{i}.mlp.experts"
GPT_OSS = Family(
    "gpt_oss",
    gpt_oss_config,
    WeightMap(
        renames=(("model.layers.{i}.mlp.router", "model.layers.{i}.mlp.gate"),),
        tensor_renames=(
            (f"{_EXPERTS}.gate_up_proj", f"{_EXPERTS}.gate_up.weight"),
            (f"{_EXPERTS}.gate_up_proj_bias", f"{_EXPERTS}.gate_up.bias"),
            (f"{_EXPERTS}.down_proj", f"{_EXPERTS}.down_proj.weight"),
            (f"{_EXPERTS}.down_proj_bias", f"{_EXPERTS}.down_proj.bias"),
        ),
        conv1d=(f"{_EXPERTS}.gate_up", f"{_EXPERTS}.down_proj"),
        fused=(
            # [X, in, 2I] with gate and up interleaved: I groups of (1 gate, 1 up) columns.
            Fused(
                f"{_EXPERTS}.gate_up",
                _EXPERTS,
                ("gate_proj", "up_proj"),
                lambda c: (c.moe_intermediate_size, (c.moe_intermediate_size, c.moe_intermediate_size)),
                experts=True,
            ),
        ),
        peft_experts=_EXPERTS,
        peft_experts_layout="in_out_interleaved",
    ),
    quirks="attention sinks, alternating sliding window, YaRN, biased router, clamped SwiGLU experts with biases",
)
