"""GPTBigCode (StarCoder, SantaCoder, Granite 13B-34B Code): GPT-2's layout and math
with MQA through one fused `c_attn` (`[q | k | v]` under MQA, per head otherwise)
and plain `nn.Linear` weights instead of GPT-2's Conv1D."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import qkv_fused, qkv_per_kv_group
from model_lib.families.gpt2 import C_ATTN, GPT2_RENAMES, gpt2_style_config
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def gpt_bigcode_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return gpt2_style_config(hf, architecture, "gpt_bigcode", num_kv_heads=1 if hf.multi_query else hf.n_head)


GPT_BIGCODE = Family(
    "gpt_bigcode",
    gpt_bigcode_config,
    WeightMap(
        renames=GPT2_RENAMES,
        fused=(qkv_fused(C_ATTN, qkv_per_kv_group),),
    ),
    quirks="MQA via fused c_attn, learned positions, LayerNorm, GELU MLP, biases",
)
