"""OPT: learned positions kept two rows past position 0, LayerNorm, ReLU MLP `fc1`/`fc2`.

OPT-350m differs from the rest: post-LN blocks (`do_layer_norm_before=False`: add,
then norm; no final norm) and token embeddings narrower than the hidden size
(`word_embed_proj_dim`, projected by `project_in` / `project_out`). The hub
checkpoints saved from the bare model name tensors `decoder.*`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import classic_fields, module_renames, require
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def opt_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    require(hf, "OPT", layer_norm_elementwise_affine=True)
    pre_norm = hf.do_layer_norm_before
    fields = classic_fields(
        hf,
        architecture,
        "opt",
        intermediate_size=hf.ffn_dim,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=1e-5,
        activation=hf.activation_function,
    )
    return ModelConfig(
        **fields,
        position_embedding="learned",
        position_offset=2,
        embedding_size=hf.word_embed_proj_dim if hf.word_embed_proj_dim != hf.hidden_size else None,
        block_norms="pre" if pre_norm else "post_residual",
        final_norm=pre_norm and not getattr(hf, "_remove_final_layer_norm", False),
        qkv_bias=hf.enable_bias,
        o_bias=hf.enable_bias,
        mlp_bias=hf.enable_bias,
    )


def _weight_map(attention_norm: str, mlp_norm: str) -> WeightMap:
    decoder = {
        f"model.decoder.{name}": f"model.{name}" for name in ("embed_tokens", "embed_positions", "project_in", "project_out")
    }
    return WeightMap(
        renames=module_renames(
            {**decoder, "model.decoder.final_layer_norm": "model.norm"},
            "model.decoder.layers.{i}",
            {
                **{f"self_attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")},
                "self_attn.out_proj": "self_attn.o_proj",
                "self_attn_layer_norm": attention_norm,
                "final_layer_norm": mlp_norm,
                "fc1": "mlp.up_proj",
                "fc2": "mlp.down_proj",
            },
        ),
        bare_prefix="model.",
    )


PRE_NORM = _weight_map("input_layernorm", "post_attention_layernorm")
POST_NORM = _weight_map("post_attention_layernorm", "post_feedforward_layernorm")

OPT = Family(
    "opt",
    opt_config,
    PRE_NORM,
    quirks="learned positions offset by 2, ReLU, pre- or post-LN (OPT-350m), project_in/out of narrower embeddings",
    weight_map_for=lambda c: PRE_NORM if c.block_norms == "pre" else POST_NORM,
)
