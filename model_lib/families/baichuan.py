"""Baichuan and Baichuan2 (remote `baichuan`): Llama names with one fused `W_pack`.

`self_attn.W_pack` stacks `[q | k | v]` (multi-head, no bias); the rest is Llama
(`o_proj`, `gate/up/down_proj`, RMSNorm `rms_norm_eps`, rotary base 10000 halves).

Which variant a config is, by the fields the upstream configs carry:
- positions: configs with `max_position_embeddings` (Baichuan-7B, Baichuan2-7B)
  use rotary; configs with only `model_max_length` (Baichuan-13B, Baichuan2-13B)
  use ALiBi with the standard slopes (`alibi_slopes`; scores get
  `slope * kv_position`, which softmax sees as `slope * (kv - q)`), no rotary.
- lm_head: Baichuan2 (configs with `z_loss_weight`, or its 125696-token vocab)
  normalises each lm_head row to unit L2 norm at every forward (NormHead); the
  checkpoint keeps the raw rows, and so do we (`lm_head_unit_norm`).

Assumptions from the published `modeling_baichuan.py` (not available offline):
the names and shapes above, attention scale head_dim**-0.5. The rotary variants
are tested against transformers' Llama holding the re-packed weights, the ALiBi
variant against a hand-written reference (tests/model_lib/test_convert_parity.py).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import llama_like_fields, qkv_fused, rope_from_params
from model_lib.layers.alibi import alibi_slopes
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

BAICHUAN2_VOCAB = 125696


def baichuan_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    rotary = getattr(hf, "max_position_embeddings", None) is not None
    max_position = None if rotary else hf.model_max_length
    fields = llama_like_fields(hf, architecture, "baichuan", max_position_embeddings=max_position, reads_head_dim=False)
    # The remote code's rotary is fixed (base 10000, no scaling): rotary keys of the config mean nothing.
    rope = rope_from_params(None, head_dim=fields["head_dim"], max_position=fields["max_position_embeddings"])
    positions = dict(rope=rope) if rotary else dict(position_embedding="alibi", alibi_slopes=alibi_slopes(hf.num_attention_heads), rope=None)
    norm_head = hasattr(hf, "z_loss_weight") or hf.vocab_size == BAICHUAN2_VOCAB
    return ModelConfig(**{**fields, **positions, "num_kv_heads": hf.num_attention_heads, "lm_head_unit_norm": norm_head})


BAICHUAN = Family(
    "baichuan",
    baichuan_config,
    WeightMap(
        fused=(qkv_fused("model.layers.{i}.self_attn.W_pack"),)
    ),
    quirks="fused `W_pack`; ALiBi when the config has no max_position_embeddings (13B); Baichuan2 NormHead",
    remote_code=True,
)
