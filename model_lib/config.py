"""`ModelConfig`: one frozen description of a checkpoint's architecture.

Every family quirk is a named field here, filled by the family's mapping from the
Hugging Face config (see `model_lib/families/`). Model code reads only this class,
never the raw HF config, so a new variant is a mapping, not new forward code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding of one layer type.

    `kind` follows transformers' `rope_type`: default, linear, dynamic, yarn,
    longrope, llama3. `rotary_dim` < head_dim means partial rotary (the first
    `rotary_dim` features of each head rotate, the rest pass through).
    """

    kind: str
    theta: float
    rotary_dim: int
    factor: float = 1.0
    # Positions the model was pretrained for (llama3, yarn, longrope) and the
    # model's own limit (dynamic NTK grows beyond it).
    original_max_position: int | None = None
    max_position: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # yarn / longrope: multiplier on cos and sin; None derives it from `factor`.
    attention_factor: float | None = None
    # GPT-J / GLM rotate adjacent pairs instead of the two halves.
    interleaved: bool = False
    # dynamic: the length is first rounded up to `max_position` times a power of two,
    # so the base grows in steps (Qwen's `use_dynamic_ntk`; with factor 2 this is its
    # NTK alpha 2^ceil(log2(len / max_position) + 1) - 1).
    dynamic_power_of_two: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only language model, normalised across families."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int

    # Embeddings and positions.
    position_embedding: str = "rope"  # "rope" | "learned" | "alibi" | "none" (rotary per layer via `rope`)
    position_offset: int = 0  # learned-position rows before position 0 (OPT keeps 2)
    alibi_slopes: tuple[float, ...] | None = None  # one per query head when position_embedding == "alibi"
    tie_word_embeddings: bool = False
    embedding_multiplier: float = 1.0  # Granite multiplier, Gemma sqrt(hidden)
    embedding_norm: bool = False  # BLOOM normalises the token embeddings

    # Normalisation.
    norm_kind: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm and Nemotron's LayerNorm1p scale by (1 + w)
    norm_bias: bool = False  # LayerNorm bias
    # "pre": norm -> sublayer -> add; "sandwich": norms on both sides (Gemma2/3, Glm4);
    # "post": sublayer -> norm -> add (Exaone4).
    block_norms: str = "pre"
    # "none": attention then MLP; "shared_norm": x + attn(n(x)) + mlp(n(x)) (GPT-J, Phi, Cohere,
    # Falcon); "two_norms": x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX, Falcon-40B).
    parallel_block: str = "none"
    final_norm: bool = True

    # Attention.
    qkv_bias: bool = False
    o_bias: bool = False
    # Norm of q and k over head_dim before rotary: "head" shares the weight across heads
    # (Qwen3, Gemma3, Phi), "per_head" has one per head (Cohere); "none".
    qk_norm: str = "none"
    clip_qkv: float | None = None  # clamp q, k, v to [-c, c] (MPT, DBRX)
    attention_scale: float | None = None  # None -> head_dim ** -0.5
    attn_logit_softcap: float | None = None
    # Queries at positions p >= n are scaled by log(p + 1) / log(n) (Qwen's `use_logn_attn`, n = seq_length).
    logn_attention_length: int | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope: RopeConfig | None = None  # full-attention layers (all layers if rope_local is None)
    rope_local: RopeConfig | None = None  # sliding-window layers, where they differ (Gemma3)

    # MLP.
    mlp_gated: bool = True
    activation: str = "silu"
    mlp_bias: bool = False

    # Residual stream and output.
    residual_multiplier: float = 1.0
    logit_multiplier: float = 1.0  # Granite divides logits by `logits_scaling`
    lm_head_bias: bool = False  # GPT-J, Phi
    lm_head_unit_norm: bool = False  # each vocab row of lm_head scaled to unit L2 norm on use (Baichuan2's NormHead)
    final_logit_softcap: float | None = None

    # Tokens the serving side needs.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    initializer_range: float = 0.02
    dtype: str = "float32"  # parameter and compute dtype
    # The checkpoint's own config.json, kept to save the model back unchanged.
    hf_config_json: str = field(default="{}", compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding-window layers need a positive sliding_window")
        if (self.position_embedding == "alibi") != (self.alibi_slopes is not None):
            raise ValueError("alibi_slopes are set exactly when position_embedding is 'alibi'")
        if self.alibi_slopes is not None and len(self.alibi_slopes) != self.num_heads:
            raise ValueError(f"{len(self.alibi_slopes)} alibi slopes for {self.num_heads} heads")
        for name, value, allowed in (
            ("position_embedding", self.position_embedding, ("rope", "learned", "alibi", "none")),
            ("block_norms", self.block_norms, ("pre", "sandwich", "post")),
            ("parallel_block", self.parallel_block, ("none", "shared_norm", "two_norms")),
            ("qk_norm", self.qk_norm, ("none", "head", "per_head")),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.parallel_block != "none" and self.block_norms != "pre":
            raise ValueError("parallel blocks take pre norms only")

    @property
    def query_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def layer_rope(self, layer: int) -> RopeConfig | None:
        if self.rope_local is not None and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.rope_local
        return self.rope

    def hf_config_dict(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
