"""The GPT-2 lineage: `transformer.wte` / `transformer.h.{i}.ln_1` / `transformer.ln_f`.

- GPT-2: learned positions, LayerNorm, biases, gelu_new MLP; every projection a
  Conv1D stored `[in, out]`, the attention's fused into `c_attn` as `[q | k | v]`.
  The original OpenAI checkpoints omit the `transformer.` prefix and carry the
  causal-mask buffers `attn.bias` / `attn.masked_bias`.
- GPT-J: one LayerNorm feeding attention and MLP in parallel, partial rotary on
  adjacent pairs (`rotary_dim`), no attention biases, lm_head with a bias.

GPTBigCode (`gpt_bigcode.py`) shares the GPT-2 config names and renames.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig, RopeConfig
from model_lib.families.common import classic_fields, module_renames, qkv_fused, refuse_tied_head_bias, require
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

TOP = {"transformer.wte": "model.embed_tokens", "transformer.wpe": "model.embed_positions", "transformer.ln_f": "model.norm"}
LAYERS = "transformer.h.{i}"
GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
GPT2_RENAMES = module_renames(TOP, LAYERS, GPT2_LAYER)
C_ATTN = f"{LAYERS}.attn.c_attn"
CAUSAL_MASK_BUFFERS = (r".*\.attn\.(masked_)?bias",)


def gpt2_fields(hf: PretrainedConfig, architecture: str, family: str, **overrides: Any) -> dict[str, Any]:
    """GPT-2-named sizes (n_embd, n_inner, n_positions, layer_norm_epsilon, activation_function)."""
    fields = classic_fields(
        hf,
        architecture,
        family,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,
        max_position_embeddings=hf.n_positions,
        norm_eps=hf.layer_norm_epsilon,
        activation=hf.activation_function,
    )
    return {**fields, **overrides}


def gpt2_style_config(hf: PretrainedConfig, architecture: str, family: str, **overrides: Any) -> ModelConfig:
    """GPT-2's math: learned positions, biases everywhere, optionally unscaled attention."""
    head_dim = hf.n_embd // hf.n_head
    return ModelConfig(
        **gpt2_fields(
            hf,
            architecture,
            family,
            position_embedding="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            attention_scale=head_dim**-0.5 if hf.scale_attn_weights else 1.0,
            **overrides,
        )
    )


def gpt2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # reorder_and_upcast_attn only upcasts q.k to float32, which our attention always does.
    require(hf, "GPT-2", scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    return gpt2_style_config(hf, architecture, "gpt2")


def gptj_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    refuse_tied_head_bias(hf, "GPT-J")
    head_dim = hf.n_embd // hf.n_head
    # Without rotary_dim transformers sizes the rotary by n_embd, which fits one head only.
    rotary_dim = hf.rotary_dim or hf.n_embd
    if rotary_dim > head_dim:
        raise ValueError(f"GPT-J with rotary_dim={hf.rotary_dim!r} is not supported (rotary_dim must be <= head_dim {head_dim})")
    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=rotary_dim, max_position=hf.n_positions, interleaved=True)
    return ModelConfig(
        **gpt2_fields(hf, architecture, "gptj", parallel_block="shared_norm", mlp_bias=True, lm_head_bias=True, rope=rope)
    )


GPT2 = Family(
    "gpt2",
    gpt2_config,
    WeightMap(
        renames=GPT2_RENAMES,
        fused=(qkv_fused(C_ATTN),),
        conv1d=(C_ATTN, f"{LAYERS}.attn.c_proj", f"{LAYERS}.mlp.c_fc", f"{LAYERS}.mlp.c_proj"),
        ignored=CAUSAL_MASK_BUFFERS,
        bare_prefix="transformer.",
    ),
    quirks="Conv1D weights stored [in, out], fused c_attn, learned positions, gelu_new",
)

GPTJ = Family(
    "gptj",
    gptj_config,
    WeightMap(
        renames=module_renames(
            TOP,
            LAYERS,
            {
                "ln_1": "input_layernorm",
                **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")},
                "attn.out_proj": "self_attn.o_proj",
                "mlp.fc_in": "mlp.up_proj",
                "mlp.fc_out": "mlp.down_proj",
            },
        ),
        ignored=CAUSAL_MASK_BUFFERS,
    ),
    quirks="parallel attention + MLP under one LayerNorm, partial rotary on adjacent pairs, lm_head bias",
)
