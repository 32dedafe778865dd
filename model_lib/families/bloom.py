"""BLOOM and its descendant Falcon: `transformer.word_embeddings`, `transformer.h.{i}`
with `self_attention.query_key_value` / `dense` and `mlp.dense_h_to_4h` / `dense_4h_to_h`.

- BLOOM: ALiBi, a LayerNorm on the token embeddings, biases everywhere, tanh GELU,
  qkv fused per head. Hub checkpoints omit the `transformer.` prefix.
- Falcon: rotary or ALiBi; one LayerNorm feeding attention and MLP in parallel
  (Falcon-7B, `parallel_attn`), two (`ln_attn` / `ln_mlp`, Falcon-40B/180B's
  `new_decoder_architecture`) or a sequential block; MQA, GQA or MHA with qkv fused
  per KV group; biases optional (`bias`).

Falcon's ALiBi bias is added to the raw scores before the 1/sqrt(head_dim) scale
(`(q.k + alibi) / sqrt(d)`), and transformers rounds the slopes to bfloat16 when it
builds the bias; our kernels add `slope * (kv_pos - q_pos)` after scaling, so the
slopes are bf16(slope) / sqrt(head_dim). transformers (like Falcon's original code)
also rounds each product bf16(slope) * kv_pos to bfloat16, which a relative bias
cannot reproduce: exact for power-of-two slopes below 256 tokens, otherwise logits
differ by about 2^-9 of the bias (5e-4 at 12 tokens with 12 heads). BLOOM adds an
exact float32 bias after scaling.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import classic_fields, module_renames, qkv_fused, qkv_per_kv_group, require, rope_from_params
from model_lib.layers.alibi import alibi_slopes
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def bloom_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    require(hf, "BLOOM", apply_residual_connection_post_layernorm=False)
    fields = classic_fields(
        hf,
        architecture,
        "bloom",
        intermediate_size=4 * hf.hidden_size,
        # BLOOM's config has no length limit; it was trained on 2048 tokens.
        max_position_embeddings=getattr(hf, "seq_length", None) or 2048,
        norm_eps=hf.layer_norm_epsilon,
        activation="gelu_pytorch_tanh",
    )
    return ModelConfig(
        **fields,
        position_embedding="alibi",
        alibi_slopes=alibi_slopes(hf.n_head),
        embedding_norm=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
    )


def falcon_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    new_arch, parallel = hf.new_decoder_architecture, hf.parallel_attn
    norms = hf.num_ln_in_parallel_attn or (2 if new_arch else 1)
    # transformers itself breaks on these combinations (a norm it never defines).
    if new_arch and not parallel:
        raise ValueError("Falcon with new_decoder_architecture and parallel_attn=False is not supported")
    if parallel and not new_arch and norms == 2:
        raise ValueError("Falcon with num_ln_in_parallel_attn=2 is supported with new_decoder_architecture only")
    heads = hf.num_attention_heads
    fields = classic_fields(
        hf,
        architecture,
        "falcon",
        intermediate_size=hf.ffn_hidden_size,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=hf.layer_norm_epsilon,
        activation=hf.activation,
        num_kv_heads=hf.num_kv_heads if new_arch else (1 if hf.multi_query else heads),
    )
    if hf.alibi:
        slopes = np.asarray(alibi_slopes(heads), ml_dtypes.bfloat16).astype(np.float64) * fields["head_dim"] ** -0.5
        positions = dict(position_embedding="alibi", alibi_slopes=tuple(float(s) for s in slopes))
    else:
        rope = rope_from_params(hf.rope_parameters, head_dim=fields["head_dim"], max_position=hf.max_position_embeddings)
        positions = dict(rope=rope)
    return ModelConfig(
        **{**fields, **positions},
        parallel_block=("two_norms" if norms == 2 else "shared_norm") if (new_arch or parallel) else "none",
        qkv_bias=hf.bias,
        o_bias=hf.bias,
        mlp_bias=hf.bias,
    )


TOP = {"transformer.word_embeddings": "model.embed_tokens", "transformer.ln_f": "model.norm"}
LAYERS = "transformer.h.{i}"
LAYER = {
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
QKV = (qkv_fused(f"{LAYERS}.self_attention.query_key_value", qkv_per_kv_group),)
NAMED_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm"}


def _falcon_weight_map(norms: dict[str, str]) -> WeightMap:
    return WeightMap(renames=module_renames(TOP, LAYERS, {**norms, **LAYER}), fused=QKV)


FALCON_NORMS = _falcon_weight_map(NAMED_NORMS)
FALCON_LN_ATTN_MLP = _falcon_weight_map({"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"})

BLOOM = Family(
    "bloom",
    bloom_config,
    WeightMap(
        renames=module_renames(
            {**TOP, "transformer.word_embeddings_layernorm": "model.embed_layernorm"}, LAYERS, {**NAMED_NORMS, **LAYER}
        ),
        fused=QKV,
        bare_prefix="transformer.",
    ),
    quirks="ALiBi, LayerNorm on the embeddings, fused per-head query_key_value, tanh GELU",
)

FALCON = Family(
    "falcon",
    falcon_config,
    FALCON_NORMS,
    quirks="parallel block with one or two norms (new_decoder_architecture) or sequential, MQA/GQA, rotary or ALiBi",
    weight_map_for=lambda c: FALCON_LN_ATTN_MLP if c.parallel_block == "two_norms" else FALCON_NORMS,
)
