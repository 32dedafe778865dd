"""MPT (MosaicML; Replit Code): ALiBi (`alibi_bias_max`), no biases anywhere, LayerNorm
without bias, `[q | k | v]` fused into `Wqkv`, optional q/k/v clipping (`clip_qkv`) and
softmax scale, plain exact-GELU MLP of `expansion_ratio` x d_model.

transformers' class ignores several options of MosaicML's remote code; those that
change the math are refused here rather than silently run differently. It also
always builds the slopes with bias max 8; `alibi_bias_max` (8 in released models)
is honoured here as the original code does.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import classic_fields, module_renames, qkv_fused, require
from model_lib.layers.alibi import alibi_slopes
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def mpt_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    attn = hf.attn_config
    require(hf, "MPT", no_bias=True, logit_scale=None)
    require(attn, "MPT attn_config", attn_type="multihead_attention", alibi=True, qk_ln=False, prefix_lm=False)
    if getattr(hf, "norm_type", "low_precision_layernorm") not in ("layernorm", "low_precision_layernorm"):
        raise ValueError(f"MPT with norm_type={hf.norm_type!r} is not supported (only layernorm)")
    fields = classic_fields(
        hf,
        architecture,
        "mpt",
        intermediate_size=hf.expansion_ratio * hf.d_model,
        max_position_embeddings=hf.max_seq_len,
        norm_eps=hf.layer_norm_epsilon,
        activation="gelu",
    )
    return ModelConfig(
        **{
            **fields,
            "norm_bias": False,
            "position_embedding": "alibi",
            "alibi_slopes": alibi_slopes(hf.n_heads, attn.alibi_bias_max),
            "attention_scale": attn.softmax_scale,
            "clip_qkv": attn.clip_qkv or None,
        }
    )


MPT = Family(
    "mpt",
    mpt_config,
    WeightMap(
        renames=module_renames(
            {"transformer.wte": "model.embed_tokens", "transformer.norm_f": "model.norm"},
            "transformer.blocks.{i}",
            {
                "norm_1": "input_layernorm",
                "norm_2": "post_attention_layernorm",
                "attn.out_proj": "self_attn.o_proj",
                "ffn.up_proj": "mlp.up_proj",
                "ffn.down_proj": "mlp.down_proj",
            },
        ),
        fused=(qkv_fused("transformer.blocks.{i}.attn.Wqkv"),),
    ),
    quirks="ALiBi with alibi_bias_max, no biases, LayerNorm without bias, fused Wqkv, clip_qkv",
)
