"""InternLM 1, 2/2.5 and 3: Llama math under three checkpoint layouts.

- InternLM (remote `internlm`): Llama names; `bias` puts biases on q/k/v/o; the
  rotary sits in `rotary: {base, type: origin|dynamic, scaling_factor}` (dynamic
  is transformers' dynamic NTK, keys rotated once as they are cached).
- InternLM2/2.5 (remote `internlm2`): `tok_embeddings`, `attention.wqkv`,
  `attention.wo`, `feed_forward.w1/w3/w2` (gate/up/down), `attention_norm`,
  `ffn_norm`, `output`. `wqkv` holds, per KV head, that group's query heads then
  its key head then its value head (`[K, H/K + 2, D]` rows); `bias` puts biases on
  wqkv and wo. `rope_theta` / `rope_scaling` as Llama's.
- InternLM3 (transformers' native `internlm3`, the Llama implementation).

The remote layouts follow the published `modeling_internlm*.py`; no copy of that
code is available offline, and the tests check it through transformers' Llama
holding the same weights re-packed (tests/remote_layouts.py).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields, qkv_fused, qkv_per_kv_group, remote_rope_params, rope_from_params
from model_lib.registry import Family
from model_lib.weight_map import WeightMap


def _with_rope(hf: PretrainedConfig, architecture: str, family: str, params: dict, bias: bool) -> ModelConfig:
    # The remote code sizes heads as hidden_size / heads and reads no Llama bias keys.
    fields = llama_like_fields(hf, architecture, family, reads_head_dim=False)
    rope = rope_from_params(params, head_dim=fields["head_dim"], max_position=fields["max_position_embeddings"])
    return ModelConfig(**{**fields, "rope": rope, "qkv_bias": bias, "o_bias": bias, "mlp_bias": False})


def internlm_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    rotary = dict(getattr(hf, "rotary", None) or {"type": "origin"})
    kind = {"origin": "default", "dynamic": "dynamic"}.get(rotary.get("type", "origin"))
    if kind is None:
        raise ValueError(f"InternLM rotary type {rotary['type']!r} is not supported (origin, dynamic)")
    params = {"rope_type": kind, "rope_theta": rotary.get("base", 10000.0), "factor": rotary.get("scaling_factor", 1.0)}
    return _with_rope(hf, architecture, "internlm", params, bool(getattr(hf, "bias", True)))


def internlm2_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return _with_rope(hf, architecture, "internlm2", remote_rope_params(hf), bool(getattr(hf, "bias", False)))


def internlm3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    # transformers runs InternLM3 as LlamaForCausalLM (its config maps qkv_bias / bias onto Llama's keys).
    return ModelConfig(**llama_like_fields(hf, architecture, "internlm3", attention_bias=True, mlp_bias=True))


INTERNLM = Family("internlm", internlm_config, quirks="Llama with q/k/v/o biases, dynamic NTK `rotary`", remote_code=True)
INTERNLM2 = Family(
    "internlm2",
    internlm2_config,
    WeightMap(
        renames=(
            ("model.tok_embeddings", "model.embed_tokens"),
            ("model.layers.{i}.attention.wo", "model.layers.{i}.self_attn.o_proj"),
            ("model.layers.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj"),
            ("model.layers.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj"),
            ("model.layers.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj"),
            ("model.layers.{i}.attention_norm", "model.layers.{i}.input_layernorm"),
            ("model.layers.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
            ("output", "lm_head"),
        ),
        fused=(qkv_fused("model.layers.{i}.attention.wqkv", qkv_per_kv_group),),
    ),
    quirks="fused `wqkv` interleaved per KV group, InternLM2 names, dynamic NTK",
    remote_code=True,
)
INTERNLM3 = Family("internlm3", internlm3_config, quirks="Llama layout, dynamic NTK")
