"""DBRX: fused `Wqkv` with q/k/v clipping, bias-free LayerNorms, and an MoE FFN in every
block (softmax top-k, weights divided by their p-norm, p = `moe_normalize_expert_weights`).
Expert weights flatten the experts into the first axis: `w1`/`v1` are `[X * I, E]`
(gate / up, `[out, in]` per expert), `w2` is `[X * I, E]` stored `[in, out]` per expert."""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, ModelConfig
from model_lib.families.common import hf_json, moe_fields, qkv_fused, rope_from_params, token_ids
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def dbrx_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    attn, ffn = hf.attn_config, hf.ffn_config
    norm_p = ffn.moe_normalize_expert_weights
    if norm_p not in (None, 1, 1.0):
        raise ValueError(f"DBRX moe_normalize_expert_weights={norm_p} is not supported (only 1 or None)")
    act = (ffn.ffn_act_fn or {}).get("name", "silu")
    head_dim = hf.d_model // hf.n_heads
    return ModelConfig(
        architecture=architecture,
        family="dbrx",
        vocab_size=hf.vocab_size,
        hidden_size=hf.d_model,
        intermediate_size=ffn.ffn_hidden_size,
        num_layers=hf.n_layers,
        num_heads=hf.n_heads,
        num_kv_heads=attn.kv_n_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.max_seq_len,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        norm_kind="layer",
        norm_eps=1e-5,
        clip_qkv=attn.clip_qkv,
        layer_types=(FULL_ATTENTION,) * hf.n_layers,
        rope=rope_from_params(getattr(hf, "rope_parameters", None), head_dim=head_dim, max_position=hf.max_seq_len),
        activation=act,
        initializer_range=hf.initializer_range,
        hf_config_json=hf_json(hf),
        **token_ids(hf),
        **moe_fields(
            hf,
            num_experts=ffn.moe_num_experts,
            moe_intermediate_size=ffn.ffn_hidden_size,
            moe_layers=[True] * hf.n_layers,
            num_experts_per_tok=ffn.moe_top_k,
            norm_topk_prob=norm_p is not None,
            router_aux_loss_coef=float(ffn.moe_loss_weight or 0.0),
        ),
    )


def _qkv_layout(c: ModelConfig) -> tuple[int, tuple[int, ...]]:
    kv = c.num_kv_heads * c.head_dim
    return 1, (c.num_heads * c.head_dim, kv, kv)


_EXPERTS = "model.layers.{i}.mlp.experts"
DBRX = Family(
    "dbrx",
    dbrx_config,
    WeightMap(
        renames=(
            ("transformer.wte", "model.embed_tokens"),
            ("transformer.norm_f", "model.norm"),
            ("transformer.blocks.{i}.norm_attn_norm.norm_1", "model.layers.{i}.input_layernorm"),
            ("transformer.blocks.{i}.norm_attn_norm.norm_2", "model.layers.{i}.post_attention_layernorm"),
            ("transformer.blocks.{i}.norm_attn_norm.attn.out_proj", "model.layers.{i}.self_attn.o_proj"),
            ("transformer.blocks.{i}.ffn.router.layer", "model.layers.{i}.mlp.gate"),
        ),
        fused=(
            qkv_fused("transformer.blocks.{i}.norm_attn_norm.attn.Wqkv", _qkv_layout),
        ),
        tensor_renames=tuple(
            (f"transformer.blocks.{{i}}.ffn.experts.mlp.{hf}", f"{_EXPERTS}.{ours}.weight")
            for hf, ours in (("w1", "gate_proj"), ("v1", "up_proj"), ("w2", "down_proj"))
        ),
        expert_rows=(f"{_EXPERTS}.gate_proj", f"{_EXPERTS}.up_proj", f"{_EXPERTS}.down_proj"),
        conv1d=(f"{_EXPERTS}.down_proj",),
    ),
    quirks="fused Wqkv with clip_qkv, bias-free LayerNorm, MoE with experts flattened into [X * I, E] tensors",
)
