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

from model_lib.cache_spec import CacheSpec, LatentKV, PagedKV, RecurrentState
from model_lib.vision.config import MultiModalConfig

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
MAX_MTP_LAYERS = 16  # a bound on `num_mtp_layers` read from a config (DeepSeek-V3 has 1)
CHUNKED_ATTENTION = "chunked_attention"  # Llama 4: keys in the query's own chunk of `attention_chunk_size` positions
# `layer_attention` kinds that hold a recurrent state instead of a KV cache ("rglru": RecurrentGemma's
# recurrent block, `model_lib/layers/rglru.py`; "gated_delta": Qwen3-Next's Gated DeltaNet).
SSM_KINDS = ("mamba", "mamba2", "rglru", "gated_delta")
MAX_SSM_CONV_KERNEL = 16  # bounds on the state-space fields read from a config
MAX_SSM_CHUNK = 4096


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
    # longrope (PhiMoE): cos/sin multipliers of the short and long regimes instead of one.
    short_mscale: float | None = None
    long_mscale: float | None = None
    # GPT-J / GLM rotate adjacent pairs instead of the two halves.
    interleaved: bool = False
    # dynamic: the length is first rounded up to `max_position` times a power of two,
    # so the base grows in steps (Qwen's `use_dynamic_ntk`; with factor 2 this is its
    # NTK alpha 2^ceil(log2(len / max_position) + 1) - 1).
    dynamic_power_of_two: bool = False
    # M-RoPE (Qwen2-VL family, GLM-4.1V): positions are `[3, ...]` (temporal, height, width) and the
    # frequencies are split into these three sections (summing to rotary_dim / 2); `mrope_interleaved`
    # (Qwen3-VL) deals height and width frequencies round-robin into the first 3 * section slots.
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False


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
    # Token-embedding width when it differs from hidden_size (OPT-350m): the embeddings
    # go through `project_in` to the hidden size and the final states through `project_out`.
    embedding_size: int | None = None

    # Normalisation.
    norm_kind: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm and Nemotron's LayerNorm1p scale by (1 + w)
    norm_bias: bool = False  # LayerNorm bias
    # "pre": norm -> sublayer -> add; "sandwich": norms on both sides (Gemma2/3, Glm4);
    # "post": sublayer -> norm -> add (Exaone4); "post_residual": add -> norm, the original
    # Transformer's post-LN (OPT-350m), with the norms post_attention/post_feedforward_layernorm.
    block_norms: str = "pre"
    # "none": attention then MLP; "shared_norm": x + attn(n(x)) + mlp(n(x)) (GPT-J, Phi, Cohere,
    # Falcon); "two_norms": x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX, Falcon-40B).
    parallel_block: str = "none"
    final_norm: bool = True

    # Attention.
    qkv_bias: bool = False
    o_bias: bool = False
    # Norm of q and k over head_dim before rotary: "head" shares the weight across heads
    # (Qwen3, Gemma3, Phi), "per_head" has one per head (Cohere); "l2": Llama 4's weightless
    # RMS norm (eps `norm_eps`) AFTER rotary, on layers with rotary only; "none".
    qk_norm: str = "none"
    clip_qkv: float | None = None  # clamp q, k, v to [-c, c] (MPT, DBRX)
    attention_scale: float | None = None  # None -> head_dim ** -0.5
    attn_logit_softcap: float | None = None
    # Queries at positions p >= n are scaled by log(p + 1) / log(n) (Qwen's `use_logn_attn`, n = seq_length).
    logn_attention_length: int | None = None
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit `self_attn.sinks` in each softmax
    # Qwen3-Next: q_proj yields [q_h | gate_h] per head; the attention output is multiplied by sigmoid(gate).
    attention_output_gate: bool = False
    # Prompts carry bidirectional spans (Gemma 3's image runs, SDAR's blocks; `model_lib/spans.py`): every
    # serving step then carries `visible_until`, so steps with and without spans share one program.
    bidirectional_spans: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_chunk_size: int | None = None  # chunked_attention layers (Llama 4)
    # SDAR: attention is block-causal over blocks of this many positions (a token sees every earlier
    # block and all of its own); decoding fills one block of `mask_token_id` at a time by diffusion.
    block_causal_size: int | None = None
    mask_token_id: int | None = None
    nope_layers: tuple[bool, ...] = ()  # per layer: True = no rotary (Llama 4's NoPE layers); empty: none
    # Llama 4's attention temperature tuning on NoPE layers: queries at position p are scaled by
    # 1 + attn_temperature_scale * log(1 + floor((p + 1) / attn_temperature_floor_scale)).
    attn_temperature_floor_scale: int | None = None
    attn_temperature_scale: float = 0.0
    rope: RopeConfig | None = None  # full-attention layers (all layers if rope_local is None)
    rope_local: RopeConfig | None = None  # sliding-window layers, where they differ (Gemma3)
    # Multi-head latent attention (MiniCPM3, DeepSeek-V2/V3) when attention_kind == "mla".
    # Queries go through a rank-`q_lora_rank` bottleneck (None: one plain q_proj); keys
    # and values come from a rank-`kv_lora_rank` latent; each query/key head is
    # [qk_nope_head_dim | qk_rope_head_dim] (rotary on the second part only, its key part
    # shared by all heads) and each value head v_head_dim. `head_dim` is then the KV-cache
    # head size, max(qk_nope_head_dim + qk_rope_head_dim, v_head_dim), and num_kv_heads == num_heads.
    attention_kind: str = "standard"  # "standard" | "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # MLP.
    mlp_gated: bool = True
    activation: str = "silu"
    mlp_bias: bool = False

    # Heterogeneous stacks (DeciLM / Nemotron-NAS): per-layer overrides, one entry per
    # layer; an empty tuple means every layer uses the global field. Attention kinds:
    # "attention", "linear" (one hidden->hidden projection `self_attn.linear_attn`, no
    # rotary, no KV cache), "none" (no attention and no input_layernorm), "mamba" / "mamba2"
    # (a state-space `mixer` behind input_layernorm, see below); MLP kinds:
    # "mlp", "linear" (`mlp.linear_mlp`), "none" (no MLP and no post_attention_layernorm).
    layer_num_kv_heads: tuple[int, ...] = ()
    layer_intermediate_sizes: tuple[int, ...] = ()
    layer_attention: tuple[str, ...] = ()
    layer_mlp: tuple[str, ...] = ()
    # State-space mixers (`model_lib/layers/ssm.py`) on layers whose `layer_attention` kind is
    # "mamba" (Mamba's selective scan, per channel `A [D, N]`) or "mamba2" (Mamba-2's SSD: one
    # decay per head, `ssm_num_heads` heads of `ssm_head_dim`, B/C shared by `ssm_num_groups`
    # groups), or "rglru" (RecurrentGemma's block, `model_lib/layers/rglru.py`: D = lru_width,
    # gates in `ssm_num_heads` diagonal blocks, no N). D = `ssm_intermediate_size`
    # channels (HF: expand * hidden), N = `ssm_state_size`,
    # a depthwise causal conv of width `ssm_conv_kernel` (activation `ssm_activation`) before the
    # scan; Mamba's dt goes through a rank-`ssm_time_step_rank` projection; Mamba-2's is clamped
    # to `ssm_dt_limit` in its chunked form (chunks of `ssm_chunk_size`) and gated-RMS-normed
    # (groups of D / `ssm_num_groups`, eps `norm_eps`) before `out_proj`.
    # "gated_delta" (Qwen3-Next's Gated DeltaNet, `model_lib/layers/gated_delta.py`) reads the same
    # fields: `ssm_num_groups` query/key heads of `ssm_state_size`, shared by `ssm_num_heads` value
    # heads of `ssm_head_dim` (D = heads * head_dim), the conv, and chunks of `ssm_chunk_size`.
    ssm_state_size: int = 0
    ssm_intermediate_size: int = 0
    ssm_conv_kernel: int = 4
    ssm_conv_bias: bool = True
    ssm_bias: bool = False  # in_proj / out_proj biases
    ssm_activation: str = "silu"
    ssm_time_step_rank: int = 0
    ssm_num_heads: int = 0
    ssm_head_dim: int = 0
    ssm_num_groups: int = 1
    ssm_chunk_size: int = 256
    ssm_dt_limit: tuple[float, float] = (0.0, float("inf"))

    # Mixture of experts (`model_lib/layers/moe.py`): layers whose `moe_layers` entry is
    # True replace the MLP by `num_experts` gated experts of width `moe_intermediate_size`,
    # `num_experts_per_tok` of them per token. Router kinds: "softmax" (softmax, top-k,
    # renormalised when `norm_topk_prob`; top-k of the logits then softmax is the same;
    # with groups, within the best `moe_topk_group` groups by their best expert: DeepSeek-V2's
    # group_limited_greedy), "sparsemixer" (PhiMoE), "sigmoid" (Glm4-MoE/DeepSeek-V3: sigmoid
    # scores, top-k of score + correction bias within the best `moe_topk_group` of
    # `moe_num_groups` groups by the sum of their best two), "topk_sigmoid" (Llama 4: top-k of
    # the logits, each weight the sigmoid of its logit).
    # `moe_scale_input` (Llama 4): the weight scales each expert's input instead of its output.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer; empty: no MoE layer
    router_kind: str = "softmax"
    moe_scale_input: bool = False
    norm_topk_prob: bool = True
    router_bias: bool = False  # gpt-oss
    router_jitter: float = 0.0  # PhiMoE's sparsemixer threshold (router_jitter_noise)
    routed_scaling_factor: float = 1.0  # multiplies the routing weights
    moe_num_groups: int = 1
    moe_topk_group: int = 1
    expert_bias: bool = False  # biases on the expert projections (gpt-oss)
    # gpt-oss's clamped SwiGLU: (clip(up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(gate, l).
    expert_swiglu_limit: float | None = None
    expert_swiglu_alpha: float = 1.702
    shared_expert_size: int = 0  # width of the always-on shared expert (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(x @ w)
    # Arctic's `parallel_attn_mlp_res`: an MoE layer's MoE reads the block input x (its norm
    # `post_attention_layernorm`) in parallel with attention, and a dense `residual_mlp` of this
    # width (behind `residual_layernorm`) runs on the post-attention stream h:
    # out = h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x)), h = x + attn(...).
    moe_residual_mlp_size: int = 0
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight for full fine-tuning
    # Multi-token-prediction blocks the checkpoint holds after the stack (DeepSeek-V3's
    # `num_nextn_predict_layers`, tensors `model.layers.{num_layers + k}.*`): loaded and kept
    # on `CausalLM.mtp` for speculative decoding, never run by the forward.
    num_mtp_layers: int = 0

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
    # Vision-language models: the vision tower and how its features replace placeholder tokens.
    multimodal: MultiModalConfig | None = None
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
        if CHUNKED_ATTENTION in self.layer_types and not (self.attention_chunk_size and self.attention_chunk_size > 0):
            raise ValueError("chunked-attention layers need a positive attention_chunk_size")
        if self.block_causal_size is not None and self.block_causal_size < 1:
            raise ValueError(f"block_causal_size must be positive, got {self.block_causal_size}")
        unknown_types = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION, CHUNKED_ATTENTION}
        if unknown_types:
            raise ValueError(f"unknown layer_types {sorted(unknown_types)}")
        if self.nope_layers and len(self.nope_layers) != self.num_layers:
            raise ValueError(f"nope_layers has {len(self.nope_layers)} entries for {self.num_layers} layers")
        if self.attn_temperature_floor_scale is not None and self.attn_temperature_floor_scale < 1:
            raise ValueError(f"attn_temperature_floor_scale must be >= 1, got {self.attn_temperature_floor_scale}")
        if (self.position_embedding == "alibi") != (self.alibi_slopes is not None):
            raise ValueError("alibi_slopes are set exactly when position_embedding is 'alibi'")
        if self.alibi_slopes is not None and len(self.alibi_slopes) != self.num_heads:
            raise ValueError(f"{len(self.alibi_slopes)} alibi slopes for {self.num_heads} heads")
        for name, value, allowed in (
            ("position_embedding", self.position_embedding, ("rope", "learned", "alibi", "none")),
            ("block_norms", self.block_norms, ("pre", "sandwich", "post", "post_residual")),
            ("parallel_block", self.parallel_block, ("none", "shared_norm", "two_norms")),
            ("qk_norm", self.qk_norm, ("none", "head", "per_head", "l2")),
            ("attention_kind", self.attention_kind, ("standard", "mla")),
            ("router_kind", self.router_kind, ("softmax", "sparsemixer", "sigmoid", "topk_sigmoid")),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.parallel_block != "none" and self.block_norms != "pre":
            raise ValueError("parallel blocks take pre norms only")
        if self.moe_residual_mlp_size and (self.block_norms != "pre" or self.parallel_block != "none"):
            raise ValueError("an MoE residual MLP (Arctic) needs sequential blocks with pre norms")
        if self.attention_kind == "mla" and (
            self.num_kv_heads != self.num_heads
            or self.head_dim < max(self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim)
        ):
            raise ValueError("MLA needs num_kv_heads == num_heads and head_dim >= both the qk and the v head dims")

        for name, values in (
            ("layer_num_kv_heads", self.layer_num_kv_heads),
            ("layer_intermediate_sizes", self.layer_intermediate_sizes),
            ("layer_attention", self.layer_attention),
            ("layer_mlp", self.layer_mlp),
        ):
            if values and len(values) != self.num_layers:
                raise ValueError(f"{name} has {len(values)} entries for {self.num_layers} layers")
        for name, values, allowed in (
            ("layer_attention", self.layer_attention, ("attention", "linear", "none", *SSM_KINDS)),
            ("layer_mlp", self.layer_mlp, ("mlp", "linear", "none")),
        ):
            if not set(values) <= set(allowed):
                raise ValueError(f"unknown {name} {sorted(set(values) - set(allowed))}; expected {allowed}")
        for layer, kv in enumerate(self.layer_num_kv_heads):  # layers without attention may say 0
            if self.layer_attention_kind(layer) == "attention" and (kv < 1 or self.num_heads % kv):
                raise ValueError(f"layer {layer}: num_heads ({self.num_heads}) is not a multiple of its {kv} kv heads")
        if (set(self.layer_attention) - {"attention"} or set(self.layer_mlp) - {"mlp"}) and (
            self.block_norms != "pre" or self.parallel_block != "none"
        ):
            raise ValueError("linear or absent sublayers need sequential blocks with pre norms")

        self._check_ssm()
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if any(self.moe_layers) and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"MoE needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= num_experts ({self.num_experts})")
        if any(self.moe_layers) and self.moe_num_groups > 1 and (
            self.num_experts % self.moe_num_groups or not 0 < self.moe_topk_group <= self.moe_num_groups
        ):
            raise ValueError(
                f"expert groups need moe_num_groups ({self.moe_num_groups}) to divide num_experts ({self.num_experts}) "
                f"and 0 < moe_topk_group ({self.moe_topk_group}) <= moe_num_groups"
            )
        if not 0 <= self.num_mtp_layers <= MAX_MTP_LAYERS:
            raise ValueError(f"num_mtp_layers ({self.num_mtp_layers}) must be in [0, {MAX_MTP_LAYERS}]")

    def _check_ssm(self) -> None:
        kinds = set(self.layer_attention) & set(SSM_KINDS)
        if not kinds:
            return
        needs_state = bool(kinds - {"rglru"})  # the RG-LRU's state is one value per channel
        if not ((0 < self.ssm_state_size or not needs_state) and 0 < self.ssm_intermediate_size
                and 1 <= self.ssm_conv_kernel <= MAX_SSM_CONV_KERNEL):
            raise ValueError(
                f"state-space layers need ssm_state_size > 0 (but RG-LRU), ssm_intermediate_size > 0 and 1 <= "
                f"ssm_conv_kernel <= {MAX_SSM_CONV_KERNEL} (got {self.ssm_state_size}, {self.ssm_intermediate_size}, "
                f"{self.ssm_conv_kernel})"
            )
        if "rglru" in kinds and not (0 < self.ssm_num_heads and self.ssm_intermediate_size % self.ssm_num_heads == 0):
            raise ValueError(f"RG-LRU layers need ssm_num_heads ({self.ssm_num_heads}) gate blocks dividing "
                             f"ssm_intermediate_size ({self.ssm_intermediate_size})")
        if "mamba" in kinds and self.ssm_time_step_rank < 1:
            raise ValueError(f"Mamba layers need ssm_time_step_rank >= 1, got {self.ssm_time_step_rank}")
        if kinds & {"mamba2", "gated_delta"}:
            heads, groups = self.ssm_num_heads, self.ssm_num_groups
            if heads < 1 or groups < 1 or heads % groups or heads * self.ssm_head_dim != self.ssm_intermediate_size:
                raise ValueError(
                    f"{'/'.join(sorted(kinds))} layers need ssm_num_heads ({heads}) a multiple of ssm_num_groups ({groups}) and "
                    f"ssm_num_heads * ssm_head_dim ({self.ssm_head_dim}) == ssm_intermediate_size ({self.ssm_intermediate_size})"
                )
            if not 1 <= self.ssm_chunk_size <= MAX_SSM_CHUNK:
                raise ValueError(f"ssm_chunk_size must be in [1, {MAX_SSM_CHUNK}], got {self.ssm_chunk_size}")
            low, high = self.ssm_dt_limit
            if not 0.0 <= low <= high:
                raise ValueError(f"ssm_dt_limit must satisfy 0 <= low <= high, got {self.ssm_dt_limit}")

    def is_ssm_layer(self, layer: int) -> bool:
        return self.layer_attention_kind(layer) in SSM_KINDS

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def embed_width(self) -> int:
        """Width of the token embeddings and of the LM head's input."""
        return self.embedding_size or self.hidden_size

    @property
    def query_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def layer_chunk(self, layer: int) -> int | None:
        """Attention chunk size of one layer, or None when it is not a chunked-attention layer."""
        return self.attention_chunk_size if self.layer_types[layer] == CHUNKED_ATTENTION else None

    def layer_rope(self, layer: int) -> RopeConfig | None:
        if self.nope_layers and self.nope_layers[layer]:
            return None
        if self.rope_local is not None and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.rope_local
        return self.rope

    def layer_kv_heads(self, layer: int) -> int:
        return self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads

    def layer_intermediate_size(self, layer: int) -> int:
        return self.layer_intermediate_sizes[layer] if self.layer_intermediate_sizes else self.intermediate_size

    def layer_attention_kind(self, layer: int) -> str:
        """One of "attention", "linear", "none", "mamba", "mamba2", "rglru", "gated_delta" (see `layer_attention`)."""
        return self.layer_attention[layer] if self.layer_attention else "attention"

    def layer_mlp_kind(self, layer: int) -> str:
        """One of "mlp", "linear", "none" (see `layer_mlp`)."""
        return self.layer_mlp[layer] if self.layer_mlp else "mlp"

    def layer_cache_kv_heads(self, layer: int) -> int:
        """KV heads this layer keeps in the paged cache: 0 for layers without attention."""
        return self.layer_kv_heads(layer) if self.layer_attention_kind(layer) == "attention" else 0

    def spans_unsupported_reason(self, paged: bool = True) -> str | None:
        """Why this model cannot attend bidirectional spans (`model_lib/spans.py`), or None. Recurrent layers
        read tokens in order; latent (MLA) pages refuse spans on the paged path (`paged`)."""
        kinds = sorted({self.layer_attention_kind(i) for i in range(self.num_layers) if self.is_ssm_layer(i)})
        if kinds:
            return f"its recurrent layers ({', '.join(kinds)}) read tokens in order"
        if paged and self.attention_kind == "mla":
            return "MLA's latent pages do not take them"
        return None

    def layer_cache_spec(self, layer: int) -> CacheSpec | None:
        """The serving state this layer keeps (`model_lib/cache_spec.py`); None for none."""
        if self.multimodal is not None and (cross := self.multimodal.cross_cache_spec(self, layer)) is not None:
            return cross  # a layer that reads the images by cross attention (Mllama)
        if self.is_ssm_layer(layer):
            return RecurrentState(self.ssm_state_shapes(layer))
        kv_heads = self.layer_cache_kv_heads(layer)
        if kv_heads and self.attention_kind == "mla":  # one latent page for all heads (`layers/mla.py`)
            return LatentKV(self.kv_lora_rank + self.qk_rope_head_dim)
        return PagedKV(kv_heads, self.head_dim) if kv_heads else None

    def ssm_state_shapes(self, layer: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv tail `[W-1, C]`, SSM state) of a state-space layer: `[D, N]` (Mamba), `[H, P, N]`
        (Mamba-2), `[D]` (RG-LRU), `[H, K, V]` (gated delta: K = ssm_state_size, V = ssm_head_dim)."""
        D, N, W = self.ssm_intermediate_size, self.ssm_state_size, self.ssm_conv_kernel
        kind = self.layer_attention_kind(layer)
        if kind == "mamba":
            return (W - 1, D), (D, N)
        if kind == "rglru":
            return (W - 1, D), (D,)
        if kind == "gated_delta":
            return (W - 1, 2 * self.ssm_num_groups * N + D), (self.ssm_num_heads, N, self.ssm_head_dim)
        return (W - 1, D + 2 * self.ssm_num_groups * N), (self.ssm_num_heads, self.ssm_head_dim, N)

    def hf_config_dict(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
