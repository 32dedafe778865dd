"""ChatGLM2, ChatGLM3 and GLM-4 in the chatglm layout (remote `chatglm`; `ChatGLMModel`
and `ChatGLMForConditionalGeneration` hold the same tensors): GLM's math.

`transformer.embedding.word_embeddings`, `transformer.encoder.layers.{i}.` with
`input_layernorm`, `self_attention.query_key_value` (fused `[q | k | v]`, K =
`multi_query_group_num` KV heads when `multi_query_attention`), `self_attention.dense`,
`post_attention_layernorm`, `mlp.dense_h_to_4h` (fused `[gate | up]`, SwiGLU),
`mlp.dense_4h_to_h`; `transformer.encoder.final_layernorm`, `transformer.output_layer`.
head_dim = `kv_channels`; rotary on the first half of each head, adjacent pairs
rotated (the "2D" RoPE of ChatGLM-6B kept as a half-rotary), base 10000 *
`rope_ratio`; RMSNorm `layernorm_epsilon`; `add_qkv_bias` / `add_bias_linear`.
The persistent `transformer.rotary_pos_emb.inv_freq` buffer is recomputed by the
remote code, so it is ignored on load and not written on save.

Assumptions from the published `modeling_chatglm.py` (not available offline):
the names and shapes above, attention scale kv_channels**-0.5. Refused with a
named error: ChatGLM-6B v1 (`position_encoding_2d`), LayerNorm (`rmsnorm: false`),
`apply_residual_connection_post_layernorm`, P-tuning prefixes (`pre_seq_len`) and
the remote int4/int8 weights (`quantization_bit`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, ModelConfig, RopeConfig
from model_lib.families.common import gate_up_fused, hf_json, qkv_fused, token_ids
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

_UNSUPPORTED = (
    ("position_encoding_2d", "ChatGLM-6B (v1) 2D positions"),
    ("apply_residual_connection_post_layernorm", "residuals taken after the norm"),
    ("pre_seq_len", "P-tuning v2 prefixes"),
    ("quantization_bit", "the remote code's quantized weights"),
)


def chatglm_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    for option, what in _UNSUPPORTED:
        if getattr(hf, option, None):
            raise ValueError(f"ChatGLM with {option} ({what}) is not supported")
    if not getattr(hf, "rmsnorm", True):
        raise ValueError("ChatGLM with rmsnorm=false (LayerNorm) is not supported")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "kv_channels", None) or hf.hidden_size // heads
    bias = bool(getattr(hf, "add_bias_linear", False))
    return ModelConfig(
        architecture=architecture,
        family="chatglm",
        vocab_size=hf.padded_vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.ffn_hidden_size,
        num_layers=hf.num_layers,
        num_heads=heads,
        num_kv_heads=hf.multi_query_group_num if getattr(hf, "multi_query_attention", False) else heads,
        head_dim=head_dim,
        max_position_embeddings=hf.seq_length,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_eps=getattr(hf, "layernorm_epsilon", 1e-5),
        final_norm=bool(getattr(hf, "post_layer_norm", True)),
        qkv_bias=bias or bool(getattr(hf, "add_qkv_bias", False)),
        o_bias=bias,
        mlp_bias=bias,
        layer_types=(FULL_ATTENTION,) * hf.num_layers,
        rope=RopeConfig(
            kind="default",
            theta=10000.0 * getattr(hf, "rope_ratio", 1.0),
            rotary_dim=head_dim // 2,
            interleaved=True,
        ),
        initializer_range=getattr(hf, "initializer_range", 0.02),
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


_LAYER = "transformer.encoder.layers.{i}"
CHATGLM = Family(
    "chatglm",
    chatglm_config,
    WeightMap(
        renames=(
            ("transformer.embedding.word_embeddings", "model.embed_tokens"),
            ("transformer.encoder.final_layernorm", "model.norm"),
            ("transformer.output_layer", "lm_head"),
            (f"{_LAYER}.input_layernorm", "model.layers.{i}.input_layernorm"),
            (f"{_LAYER}.post_attention_layernorm", "model.layers.{i}.post_attention_layernorm"),
            (f"{_LAYER}.self_attention.dense", "model.layers.{i}.self_attn.o_proj"),
            (f"{_LAYER}.mlp.dense_4h_to_h", "model.layers.{i}.mlp.down_proj"),
        ),
        fused=(
            qkv_fused(f"{_LAYER}.self_attention.query_key_value"),
            gate_up_fused(f"{_LAYER}.mlp.dense_h_to_4h"),
        ),
        ignored=(r"transformer\.rotary_pos_emb\.inv_freq",),
    ),
    quirks="fused query_key_value (MQA groups) and dense_h_to_4h, half-rotary interleaved RoPE with rope_ratio",
    remote_code=True,
)
