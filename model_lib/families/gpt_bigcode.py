"""GPTBigCode (StarCoder, SantaCoder, Granite 13B-34B Code): learned positions,
LayerNorm with bias, plain GELU MLP, biases everywhere, MQA through one fused
`c_attn`. HF names differ from ours, so the weight map renames them."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, ModelConfig
from model_lib.families.common import hf_json, token_ids
from model_lib.registry import Family
from model_lib.weight_map import Fused, WeightMap


def gpt_bigcode_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    head_dim = hf.n_embd // hf.n_head
    return ModelConfig(
        architecture=architecture,
        family="gpt_bigcode",
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        num_kv_heads=1 if hf.multi_query else hf.n_head,
        head_dim=head_dim,
        max_position_embeddings=hf.n_positions,
        position_embedding="learned",
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        norm_kind="layer",
        norm_eps=hf.layer_norm_epsilon,
        norm_bias=True,
        qkv_bias=True,
        o_bias=True,
        attention_scale=head_dim**-0.5 if hf.scale_attn_weights else 1.0,
        layer_types=(FULL_ATTENTION,) * hf.n_layer,
        rope=None,
        mlp_gated=False,
        activation=hf.activation_function,
        mlp_bias=True,
        initializer_range=hf.initializer_range,
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


def _c_attn_layout(c: ModelConfig) -> tuple[int, tuple[int, ...]]:
    q = c.num_heads * c.head_dim
    if c.num_kv_heads == 1:  # multi-query: [q | k | v]
        return 1, (q, c.head_dim, c.head_dim)
    return c.num_heads, (q, q, q)  # multi-head: per head [q_h | k_h | v_h]


GPT_BIGCODE = Family(
    "gpt_bigcode",
    gpt_bigcode_config,
    WeightMap(
        renames=(
            ("transformer.wte", "model.embed_tokens"),
            ("transformer.wpe", "model.embed_positions"),
            ("transformer.ln_f", "model.norm"),
            ("transformer.h.{i}.ln_1", "model.layers.{i}.input_layernorm"),
            ("transformer.h.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
            ("transformer.h.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj"),
            ("transformer.h.{i}.mlp.c_fc", "model.layers.{i}.mlp.up_proj"),
            ("transformer.h.{i}.mlp.c_proj", "model.layers.{i}.mlp.down_proj"),
        ),
        fused=(
            Fused("transformer.h.{i}.attn.c_attn", "model.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj"), _c_attn_layout),
        ),
    ),
    quirks="MQA via fused c_attn, learned positions, LayerNorm, GELU MLP, biases",
)
