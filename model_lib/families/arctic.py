"""Snowflake Arctic (`ArcticForCausalLM`): a Llama-style dense transformer with a residual MoE.

Reference "own": no transformers class; the math is that of the checkpoint's remote code,
`modeling_arctic.py` of Snowflake/snowflake-arctic-instruct (its "local", non-DeepSpeed MoE
path). Reproduced from it:
- Llama attention without biases (rotary from `rope_theta` / `rope_scaling`, GQA,
  head_dim = hidden_size / heads), RMSNorm, SiLU-gated MLPs stored as `w1` (gate), `w3`
  (up), `w2` (down);
- layer i is an MoE layer when (i + 1) % `moe_layer_frequency` == 0: `num_local_experts`
  experts of width `intermediate_size` under `block_sparse_moe.experts.{e}`, a softmax
  router `block_sparse_moe.gate`, top-`num_experts_per_tok`, weights renormalised; other
  layers have the dense MLP `block_sparse_moe.mlp` of the same width;
- `parallel_attn_mlp_res` (MoE layers only): the MoE reads the block's INPUT x through
  `post_attention_layernorm`, in parallel with attention, and a dense `residual_mlp` of
  width hidden_size behind `residual_layernorm` runs on h = x + attn(input_layernorm(x)):
  out = h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x)).
DeepSpeed's MoE options (capacity factors, token dropping, expert tensor parallelism,
`quantization`) only configure the training-time DeepSpeed path and change nothing in the
local forward; a sliding window is refused.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import W1_W3_W2, expert_stack, llama_like_fields, moe_fields, require
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def arctic_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    require(hf, "Arctic", sliding_window=None)
    layers, frequency = hf.num_hidden_layers, hf.moe_layer_frequency
    if not 1 <= frequency <= layers:
        raise ValueError(f"Arctic moe_layer_frequency={frequency} must be in 1..{layers}")
    residual = bool(getattr(hf, "parallel_attn_mlp_res", False))
    return ModelConfig(
        **llama_like_fields(hf, architecture, "arctic", reads_head_dim=False),
        **moe_fields(
            hf,
            num_experts=hf.num_local_experts,
            moe_intermediate_size=hf.intermediate_size,
            moe_layers=[(i + 1) % frequency == 0 for i in range(layers)],
            moe_residual_mlp_size=hf.hidden_size if residual else 0,
        ),
    )


_LAYER = "model.layers.{i}"
ARCTIC = Family(
    "arctic",
    arctic_config,
    WeightMap(
        renames=(
            (f"{_LAYER}.block_sparse_moe.gate", f"{_LAYER}.mlp.gate"),
            *((f"{_LAYER}.block_sparse_moe.mlp.{hf}", f"{_LAYER}.mlp.{ours}") for hf, ours in W1_W3_W2.items()),
            *((f"{_LAYER}.residual_mlp.{hf}", f"{_LAYER}.residual_mlp.{ours}") for hf, ours in W1_W3_W2.items()),
        ),
        stacked=expert_stack(f"{_LAYER}.block_sparse_moe.experts", W1_W3_W2),
    ),
    quirks="dense layers and MoE layers by moe_layer_frequency, MoE on the block input beside a dense residual MLP "
    "(remote code, own reference)",
    remote_code=True,
)
