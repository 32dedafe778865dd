"""Reading the Hugging Face config fields that most families share.

Each family module turns a `transformers` config into a `ModelConfig` with
`llama_like_fields` plus its own quirks; this file is the only place that knows
transformers' config conventions (`rope_parameters`, `layer_types`, token ids).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from transformers import PretrainedConfig

from model_lib.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeConfig
from model_lib.layers.mla import mla_softmax_scale
from model_lib.weight_map import Fused, Stacked, WeightMap


def rope_from_params(
    params: dict[str, Any] | None, *, head_dim: int, max_position: int, partial_rotary: bool = False
) -> RopeConfig:
    """A `RopeConfig` from one transformers `rope_parameters` dict.

    `partial_rotary`: the class rotates only `partial_rotary_factor` of each head (GLM,
    GPT-NeoX, Nemotron, Phi, Phi-3). transformers' configs fold that key into
    `rope_parameters` for every class; the others ignore it.
    """
    params = dict(params or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", 1.0) if partial_rotary else 1.0
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        # LongRoPE / YaRN checkpoints (Phi-3) may give only the two lengths.
        factor = max_position / original if (original and kind in ("longrope", "yarn")) else 1.0
    rope = RopeConfig(
        kind=kind,
        theta=float(params.get("rope_theta", 10000.0)),
        rotary_dim=int(head_dim * partial),
        factor=float(factor),
        original_max_position=original or max_position,
        max_position=max_position,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=tuple(params.get("short_factor") or ()),
        long_factor=tuple(params.get("long_factor") or ()),
        attention_factor=params.get("attention_factor"),
        short_mscale=params.get("short_mscale"),
        long_mscale=params.get("long_mscale"),
    )
    if kind not in ("default", "linear", "dynamic", "yarn", "longrope", "llama3"):
        raise ValueError(f"unsupported rope_type {kind!r}")
    if kind == "longrope" and len(rope.short_factor) != rope.rotary_dim // 2:
        raise ValueError(f"longrope short_factor needs {rope.rotary_dim // 2} entries, got {len(rope.short_factor)}")
    return rope


# How a class reads `sliding_window` (see `window_fields`).
NO_WINDOW = "none"  # the class has no sliding window: `sliding_window` / `layer_types` mean nothing
EVERY_LAYER = "every_layer"  # every layer slides by `sliding_window` when it is set (Mistral)
PER_LAYER_TYPE = "layer_types"  # per `layer_types`, which the config derives (Qwen2, Gemma2)


def window_fields(hf: PretrainedConfig, windows: str) -> dict[str, Any]:
    """`layer_types` and `sliding_window` as the transformers class reads them.

    `PER_LAYER_TYPE` takes the config's `layer_types`: transformers' configs derive them
    in `__init__` from their own keys (Qwen2's `use_sliding_window` / `max_window_layers`,
    Exaone4's `sliding_window_pattern`) and null `sliding_window` where those turn it off.
    """
    n = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None) if windows != NO_WINDOW else None
    if windows == PER_LAYER_TYPE:
        types = tuple(getattr(hf, "layer_types", None) or (FULL_ATTENTION,) * n)
    elif windows == EVERY_LAYER:
        types = ((SLIDING_ATTENTION,) if window is not None else (FULL_ATTENTION,)) * n
    elif windows == NO_WINDOW:
        types = (FULL_ATTENTION,) * n
    else:
        raise ValueError(f"unknown window reading {windows!r}")
    return dict(layer_types=types, sliding_window=window if SLIDING_ATTENTION in types else None)


def token_ids(hf: PretrainedConfig) -> dict[str, Any]:
    eos = getattr(hf, "eos_token_id", None)
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return dict(bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos, pad_token_id=getattr(hf, "pad_token_id", None))


def hf_json(hf: PretrainedConfig) -> str:
    return json.dumps(hf.to_dict(), sort_keys=True, default=str)


def remote_rope_params(hf: PretrainedConfig, default_theta: float = 10000.0) -> dict[str, Any]:
    """The `rope_parameters` of a remote-code config, with `default_theta` where it names no base.

    `checkpoint.load_config` already folded its `rope_scaling` / `rope_theta` into
    `rope_parameters`; a config with neither has none.
    """
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if params.get("rope_theta") is None:  # a folded rope_scaling without rope_theta leaves None
        params["rope_theta"] = default_theta
    return params


def gate_up_layout(c: ModelConfig) -> tuple[int, tuple[int, ...]]:
    """A fused `[gate | up]` MLP projection."""
    return 1, (c.intermediate_size, c.intermediate_size)


def llama_like_fields(
    hf: PretrainedConfig,
    architecture: str,
    family: str,
    *,
    max_position_embeddings: int | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    windows: str = NO_WINDOW,
    partial_rotary: bool = False,
    reads_head_dim: bool = True,
) -> dict[str, Any]:
    """Fields of a RoPE + RMSNorm + gated-MLP decoder as transformers' Llama names them.

    The keyword flags say which optional keys the family's class reads, so that a key
    it ignores is ignored here too: `attention_bias` (on q/k/v/o), `mlp_bias`, the
    sliding window (`windows`, see `window_fields`), `partial_rotary_factor`
    (`partial_rotary`), `head_dim` (`reads_head_dim`; else hidden_size / heads).
    """
    derived_head_dim = hf.hidden_size // hf.num_attention_heads
    head_dim = (getattr(hf, "head_dim", None) if reads_head_dim else None) or derived_head_dim
    max_position_embeddings = max_position_embeddings or hf.max_position_embeddings
    attn_bias = attention_bias and bool(getattr(hf, "attention_bias", False))
    return dict(
        architecture=architecture,
        family=family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_kind="rms",
        norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        mlp_bias=mlp_bias and bool(getattr(hf, "mlp_bias", False)),
        activation=getattr(hf, "hidden_act", "silu"),
        **window_fields(hf, windows),
        rope=rope_from_params(
            getattr(hf, "rope_parameters", None),
            head_dim=head_dim,
            max_position=max_position_embeddings,
            partial_rotary=partial_rotary,
        ),
        initializer_range=getattr(hf, "initializer_range", 0.02),
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


def gate_up_fused(hf_module: str = "model.layers.{i}.mlp.gate_up_proj", parent: str = "model.layers.{i}.mlp") -> Fused:
    """A fused `[gate | up]` MLP input projection (Phi-3, GLM), split into `parent`'s gate_proj and up_proj."""
    return Fused(hf_module, parent, ("gate_proj", "up_proj"), gate_up_layout)


def require(hf: PretrainedConfig, family: str, **supported: Any) -> None:
    """Raise a ValueError naming the first option of `hf` that is not at its one supported value."""
    for name, value in supported.items():
        actual = getattr(hf, name, value)
        if actual != value:
            raise ValueError(f"{family} with {name}={actual!r} is not supported (only {name}={value!r})")


def classic_fields(
    hf: PretrainedConfig,
    architecture: str,
    family: str,
    *,
    intermediate_size: int,
    max_position_embeddings: int,
    norm_eps: float,
    activation: str,
    num_kv_heads: int | None = None,
) -> dict[str, Any]:
    """Fields of a LayerNorm decoder with a plain MLP and no rotary (GPT-2 lineage, OPT, BLOOM, MPT).

    Reads the sizes through transformers' standard attribute names (each config's
    `attribute_map` resolves GPT-2's `n_embd`, MPT's `d_model`, ...); families add
    positions, biases and block layout.
    """
    hidden, heads, layers = hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers
    return dict(
        architecture=architecture,
        family=family,
        vocab_size=hf.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=num_kv_heads or heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        norm_kind="layer",
        norm_eps=norm_eps,
        norm_bias=True,
        mlp_gated=False,
        activation=activation,
        layer_types=(FULL_ATTENTION,) * layers,
        rope=None,
        initializer_range=getattr(hf, "initializer_range", 0.02),
        hf_config_json=hf_json(hf),
        **token_ids(hf),
    )


def module_renames(top: dict[str, str], layer_prefix: str, layer: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """WeightMap renames from top-level modules and per-layer modules (relative to `layer_prefix`)."""
    per_layer = tuple((f"{layer_prefix}.{hf}", f"model.layers.{{i}}.{ours}") for hf, ours in layer.items())
    return tuple(top.items()) + per_layer


def qkv_concatenated(c: ModelConfig) -> tuple[int, tuple[int, ...]]:
    """Fused qkv laid out `[q | k | v]` (GPT-2's c_attn, MPT's Wqkv)."""
    kv = c.num_kv_heads * c.head_dim
    return 1, (c.num_heads * c.head_dim, kv, kv)


def qkv_per_kv_group(c: ModelConfig) -> tuple[int, tuple[int, ...]]:
    """Fused qkv laid out per KV head: `[its query heads | k | v]`, i.e. `[q_h | k_h | v_h]` per head
    without GQA (GPT-NeoX, BLOOM, Falcon, GPTBigCode; `[q | k | v]` under MQA)."""
    kv = c.num_kv_heads * c.head_dim
    return c.num_kv_heads, (c.num_heads * c.head_dim, kv, kv)


def refuse_tied_head_bias(hf: PretrainedConfig, family: str) -> None:
    """Families whose lm_head has a bias: tying would drop it, so refuse tied checkpoints."""
    if getattr(hf, "tie_word_embeddings", False):
        raise ValueError(f"{family} with tie_word_embeddings=True is not supported (its lm_head has a bias)")


def moe_fields(
    hf: PretrainedConfig, *, num_experts: int, moe_intermediate_size: int, moe_layers: Any = None, **extra: Any
) -> dict[str, Any]:
    """MoE fields of `ModelConfig`: every layer MoE unless `moe_layers` (one bool per layer) says otherwise."""
    fields = dict(
        num_experts=num_experts,
        num_experts_per_tok=getattr(hf, "num_experts_per_tok", 0),
        moe_intermediate_size=moe_intermediate_size,
        moe_layers=tuple(bool(m) for m in moe_layers) if moe_layers is not None else (True,) * hf.num_hidden_layers,
        router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    )
    return {**fields, **extra}


def expert_stack(hf_experts: str, names: dict[str, str]) -> tuple[Stacked, ...]:
    """Per-expert HF modules `{hf_experts}.{e}.<hf name>` stacked into `model.layers.{i}.mlp.experts.<ours>`."""
    return tuple(Stacked(f"{hf_experts}.{{e}}.{hf}", f"model.layers.{{i}}.mlp.experts.{ours}") for hf, ours in names.items())


PEFT_EXPERTS = "model.layers.{i}.mlp.experts"
"""Where transformers 5 and we both hold a layer's experts (`WeightMap.peft_experts`: PEFT can adapt them)."""

GATE_UP_DOWN = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
W1_W3_W2 = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral-style expert names


def qkv_fused(hf_module: str, layout: Callable[[ModelConfig], tuple[int, tuple[int, ...]]] = qkv_concatenated) -> Fused:
    """A fused q/k/v projection, split into the layer's `self_attn.{q,k,v}_proj` by `layout`."""
    return Fused(hf_module, "model.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj"), layout)


def mla_fields(hf: PretrainedConfig, rope: RopeConfig | None) -> dict[str, Any]:
    """Multi-head latent attention fields (MiniCPM3, DeepSeek-V2/V3; `model_lib/layers/mla.py`).

    The expanded K/V have one head per query head; the cache head holds the larger of
    the qk and v head dims. The softmax scale takes DeepSeek's YaRN mscale correction.
    """
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    return dict(
        attention_kind="mla",
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        num_kv_heads=hf.num_attention_heads,
        head_dim=max(qk_head_dim, hf.v_head_dim),
        attention_scale=mla_softmax_scale(qk_head_dim, rope),
    )


SHARED_EXPERTS_RENAMES = tuple(
    (f"model.layers.{{i}}.mlp.shared_experts.{p}", f"model.layers.{{i}}.mlp.shared_expert.{p}") for p in GATE_UP_DOWN
)
"""`mlp.shared_experts` (Glm4-MoE, DeepSeek: the always-on experts as one MLP) is our `mlp.shared_expert`."""


MTP_SHARED_COPIES = r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\..*"
"""An MTP block's copies of the model's embeddings and LM head (DeepSeek-V3 ships them, GLM-4.6 does not):
not loaded, the draft reads the model's own (`model_lib/decoder.py` `MTPLayer`)."""


SHARED_EXPERTS_WEIGHTS = WeightMap(
    renames=SHARED_EXPERTS_RENAMES,
    stacked=expert_stack("model.layers.{i}.mlp.experts", GATE_UP_DOWN),
    peft_experts=PEFT_EXPERTS,
)
"""Per-expert routed experts stacked on load, `shared_experts` renamed (DeepSeek, Glm4-MoE)."""


def with_mtp_blocks(config: ModelConfig) -> WeightMap:
    """`SHARED_EXPERTS_WEIGHTS` with the MTP blocks after the stack (`model.layers.{N + k}`, DeepSeek-V3 and
    GLM-4.5) held on `mtp.{k}`, so their experts stack and their shared experts rename as every layer's do."""
    relocated = tuple((f"model.layers.{config.num_layers + k}", f"mtp.{k}") for k in range(config.num_mtp_layers))
    weights = SHARED_EXPERTS_WEIGHTS
    return dataclasses.replace(weights, relocated=relocated, ignored=(*weights.ignored, MTP_SHARED_COPIES))
