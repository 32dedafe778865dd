"""Qwen (1) (remote `qwen`, `QWenLMHeadModel`): Qwen2's math under GPT-2-style names.

`transformer.wte`, `transformer.h.{i}.ln_1` / `attn.c_attn` (fused `[q | k | v]`
with bias) / `attn.c_proj` / `ln_2` / `mlp.w1, w2, c_proj`, `transformer.ln_f`,
`lm_head`. The MLP is `c_proj(w1(x) * silu(w2(x)))`: w2 is the gate, w1 the up
projection, and `intermediate_size` counts both halves (each is half of it).
RMSNorm with `layer_norm_epsilon`; `no_bias` drops the c_proj and MLP biases
(c_attn always has one); rotary of `kv_channels * rotary_pct` features (halves)
with base `rotary_emb_base`.

Past `seq_length` tokens Qwen grows its context two ways, both supported:
`use_dynamic_ntk` scales the rotary base by alpha^(d/(d-2)) with
alpha = 2^ceil(log2(len / seq_length) + 1) - 1 (`RopeConfig.dynamic_power_of_two`;
alpha follows each sequence's current length, where the remote code keeps the
prompt's alpha through generation), and `use_logn_attn` scales the query at
position p by log(p + 1) / log(seq_length) (`logn_attention_length`). Both leave
sequences within `seq_length` unchanged.

Assumptions from the published `modeling_qwen.py` (not available offline): the
names and shapes above, head_dim = hidden_size / heads = kv_channels.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, ModelConfig, RopeConfig
from model_lib.families.common import hf_json, qkv_fused, token_ids
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def qwen_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    heads, hidden = hf.num_attention_heads, hf.hidden_size
    head_dim = getattr(hf, "kv_channels", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"Qwen with kv_channels ({head_dim}) x heads ({heads}) != hidden_size ({hidden}) is not supported")
    if getattr(hf, "use_cache_quantization", False):
        raise ValueError("Qwen with use_cache_quantization (int8 KV cache of the remote code) is not supported")
    seq_length = getattr(hf, "seq_length", None) or hf.max_position_embeddings
    bias = not getattr(hf, "no_bias", True)
    dynamic = bool(getattr(hf, "use_dynamic_ntk", False))
    rope = RopeConfig(
        kind="dynamic" if dynamic else "default",
        theta=float(getattr(hf, "rotary_emb_base", 10000.0)),
        rotary_dim=int(head_dim * getattr(hf, "rotary_pct", 1.0)),
        factor=2.0 if dynamic else 1.0,
        original_max_position=seq_length,
        max_position=seq_length,
        dynamic_power_of_two=dynamic,
    )
    return ModelConfig(
        architecture=architecture,
        family="qwen",
        vocab_size=hf.vocab_size,
        hidden_size=hidden,
        intermediate_size=hf.intermediate_size // 2,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(hf, "max_position_embeddings", None) or seq_length,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_eps=getattr(hf, "layer_norm_epsilon", 1e-6),
        qkv_bias=True,
        o_bias=bias,
        mlp_bias=bias,
        attention_scale=None if getattr(hf, "scale_attn_weights", True) else 1.0,
        logn_attention_length=seq_length if getattr(hf, "use_logn_attn", False) else None,
        layer_types=(FULL_ATTENTION,) * hf.num_hidden_layers,
        rope=rope,
        initializer_range=getattr(hf, "initializer_range", 0.02),
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


QWEN = Family(
    "qwen",
    qwen_config,
    WeightMap(
        renames=(
            ("transformer.wte", "model.embed_tokens"),
            ("transformer.ln_f", "model.norm"),
            ("transformer.h.{i}.ln_1", "model.layers.{i}.input_layernorm"),
            ("transformer.h.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
            ("transformer.h.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj"),
            ("transformer.h.{i}.mlp.w1", "model.layers.{i}.mlp.up_proj"),
            ("transformer.h.{i}.mlp.w2", "model.layers.{i}.mlp.gate_proj"),
            ("transformer.h.{i}.mlp.c_proj", "model.layers.{i}.mlp.down_proj"),
        ),
        fused=(qkv_fused("transformer.h.{i}.attn.c_attn"),),
    ),
    quirks="fused `c_attn`, GPT-2-style names, halved intermediate_size, dynamic NTK and logn attention past seq_length",
    remote_code=True,
)
