"""The table of tiny Hugging Face configs that every model_lib test runs over.

One row per variant that matters (GQA/MQA, tied/untied, each rotary scaling,
sliding windows shorter than the test sequence, biases, multipliers). Each row is
built with transformers + PyTorch at a fixed seed and saved with
`save_pretrained`, once per test session. Rows with a `layout` then re-pack the
saved checkpoint into a layout only remote code reads (`tests/remote_layouts.py`);
the native model stays the reference.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import transformers

SEQ_LEN = 12  # longer than every sliding window and every "original" rotary length below
VOCAB = 128
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class TinyCase:
    name: str
    config_class: str
    overrides: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, Any] = field(default_factory=lambda: dict(DIMS))
    # A remote-code layout to write (`tests/remote_layouts.py`), its options, and the
    # architecture its config.json names (required with a layout).
    layout: str | None = None
    layout_options: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    # "module:function" that writes the checkpoint itself (no native class holds the
    # same weights) and returns its torch reference, e.g. tests/deci_reference.py.
    builder: str | None = None
    # The transformers class to build where AutoModelForCausalLM would pick another
    # (Llama 4's conditional-generation checkpoint, whose text path we load).
    model_class: str | None = None
    # The submodule of the built model that is the reference (a conditional checkpoint's
    # `language_model`; transformers' Llama 4 conditional forward fails without images).
    reference: str | None = None
    # Extra noise (regex over parameter / persistent buffer names -> std), e.g. to make MoE
    # routers decisive so that float rounding never decides a top-k choice.
    noise: dict[str, float] = field(default_factory=dict)

    def hf_config(self) -> transformers.PretrainedConfig:
        # A copy: transformers' configs edit nested dicts (rope_parameters) in place.
        return getattr(transformers, self.config_class)(**copy.deepcopy({**self.dims, **self.overrides}))

    def hf_architecture(self) -> str:
        """The architecture the checkpoint's config.json names."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return self.architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.hf_config().model_type]


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
SMALL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # for configs whose defaults exceed VOCAB
GLM_TOKENS = dict(pad_token_id=0, eos_token_id=2)  # GLM's defaults exceed VOCAB
BIGCODE_DIMS = dict(vocab_size=VOCAB, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=64)
# MiniCPM3Config defaults num_key_value_heads to 40 whatever the head count; MLA has one kv head per head.
MLA_DIMS = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8)
OPT_DIMS = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
FALCON_DIMS = dict(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2, num_attention_heads=4)
BLOOM_DIMS = dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)  # MLP fixed at 4 x hidden
MPT_DIMS = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=64)  # MLP fixed at 4 x d_model
DECI_BUILDER = "tests.deci_reference:build_deci_checkpoint"
GROK_BUILDER = "tests.grok_reference:build_grok_checkpoint"
ARCTIC_BUILDER = "tests.arctic_reference:build_arctic_checkpoint"
SDAR_BUILDER = "tests.sdar_reference:build_sdar_checkpoint"
# MoE: 4 experts, top-2; router weights (HF names: gate, router) get large noise so that top-k is decisive.
MOE = dict(num_experts_per_tok=2)
GRANITE_MULTIPLIERS = dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0)
ROUTER_NOISE = {r".*\.(gate|router(\.layer)?)\.weight": 0.5}
# DeepSeek MoE: 8 experts of width 32 (2 per token), one shared expert, the first layer dense.
DEEPSEEK_MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1)
# State-space models: no attention heads or MLP; Mamba-2 in 2 groups of 4 heads, chunks of 5 (SEQ_LEN spans 3).
MAMBA_DIMS = dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
MAMBA2_DIMS = dict(MAMBA_DIMS, num_heads=8, head_dim=16, n_groups=2, chunk_size=5)
# RecurrentGemma: recurrent, recurrent, attention (MQA, window 4 < SEQ_LEN, rotary on half of each head);
# lru_width 32 (4 gate blocks of 8) differs from hidden; a soft-cap the tiny logits reach.
RECURRENT_GEMMA = dict(num_hidden_layers=3, num_key_value_heads=1, lru_width=32, attention_window_size=4,
                       logits_soft_cap=2.0)
DEEPSEEK_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0)
# Llama 4: layer 2 NoPE (full attention, temperature tuning within SEQ_LEN), layers 0-1 rotary with
# chunks of 4 positions and q/k L2 norm; layers 1 and 2 MoE (4 experts, sigmoid top-1 scaling the input).
LLAMA4_TEXT = dict(
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_local_experts=4,
    num_experts_per_tok=1,
    moe_layers=[1, 2],
    no_rope_layers=[1, 1, 0],
    attention_chunk_size=4,
    floor_scale=3,
    attn_scale=0.5,
    **SMALL_TOKENS,
)
LLAMA4_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=28,
                     patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
LLAVA_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8)
MLLAMA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                     image_size=16, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0],
                     vision_output_dim=64)
QWEN2_VL_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4)
QWEN2_5_VL_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=32, num_heads=2, patch_size=4,
                         window_size=16, fullatt_block_indexes=[0])
QWEN3_VL_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=32, num_heads=2, patch_size=4,
                       num_position_embeddings=4, deepstack_visual_indexes=[0])
GLM4V_VISION = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=32, num_heads=2, patch_size=4,
                    image_size=16)

CASES = [
    TinyCase("llama-gqa", "LlamaConfig", dict(num_key_value_heads=2)),
    TinyCase("llama-mqa-tied-llama3", "LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3)),
    TinyCase("llama-linear-bias", "LlamaConfig", dict(attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    TinyCase("llama-dynamic", "LlamaConfig", dict(num_key_value_heads=2, max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    TinyCase(
        "llama-yarn-headdim",
        "LlamaConfig",
        dict(num_key_value_heads=2, head_dim=32, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    ),
    TinyCase("mistral-sliding", "MistralConfig", dict(num_key_value_heads=2, sliding_window=5)),
    TinyCase("qwen2-bias", "Qwen2Config", dict(num_key_value_heads=2)),
    TinyCase("qwen2-sliding", "Qwen2Config", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    TinyCase("qwen3-qknorm", "Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    TinyCase(
        "granite-multipliers",
        "GraniteConfig",
        dict(num_key_value_heads=2, embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0),
    ),
    TinyCase(
        "gemma3-local-global",
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            final_logit_softcapping=5.0,
        ),
    ),
    TinyCase(
        "phi3-longrope-partial",
        "Phi3Config",
        dict(
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            **SMALL_TOKENS,
            max_position_embeddings=32,
            original_max_position_embeddings=8,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [2.0, 3.0, 4.0, 8.0]},
        ),
    ),
    TinyCase("phi3-sliding", "Phi3Config", dict(num_key_value_heads=4, sliding_window=6, **SMALL_TOKENS)),
    TinyCase("gemma-mqa", "GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    TinyCase(
        "gemma2-softcaps",
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=1.0,
            final_logit_softcapping=5.0,
        ),
    ),
    TinyCase("starcoder2-sliding", "Starcoder2Config", dict(num_key_value_heads=2, sliding_window=5, **SMALL_TOKENS)),
    TinyCase("nemotron-partial", "NemotronConfig", dict(num_key_value_heads=2, head_dim=16)),
    TinyCase(
        "exaone4-hybrid",
        "Exaone4Config",
        dict(num_key_value_heads=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    ),
    TinyCase("glm-partial", "GlmConfig", dict(num_key_value_heads=2, head_dim=16, **SMALL_TOKENS)),
    TinyCase("glm4-post-norms", "Glm4Config", dict(num_key_value_heads=2, head_dim=16, **SMALL_TOKENS)),
    TinyCase(
        "cohere-qknorm",
        "CohereConfig",
        dict(num_key_value_heads=2, use_qk_norm=True, attention_bias=True, logit_scale=0.5, **SMALL_TOKENS),
    ),
    TinyCase("gpt_bigcode-mqa", "GPTBigCodeConfig", dict(multi_query=True), BIGCODE_DIMS),
    TinyCase("gpt_bigcode-mha-untied", "GPTBigCodeConfig", dict(multi_query=False, tie_word_embeddings=False), BIGCODE_DIMS),
    # MLA: q through a rank-32 bottleneck, kv latent rank 16, LongRoPE on the rope part, MiniCPM's default multipliers.
    TinyCase(
        "minicpm3-mla-longrope",
        "MiniCPM3Config",
        dict(
            **MLA_DIMS,
            q_lora_rank=32,
            qk_nope_head_dim=16,
            max_position_embeddings=32,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [2.0, 3.0, 4.0, 8.0],
                "original_max_position_embeddings": 8,
            },
        ),
    ),
    # MLA with a plain q_proj (DeepSeek-V2-Lite style), v heads wider than qk heads, biases, untied head.
    TinyCase(
        "minicpm3-noqlora-widev-untied",
        "MiniCPM3Config",
        dict(
            **MLA_DIMS,
            q_lora_rank=None,
            qk_nope_head_dim=8,
            v_head_dim=24,
            attention_bias=True,
            tie_word_embeddings=False,
            scale_emb=2.5,
            scale_depth=2.0,
            dim_model_base=32,
        ),
    ),
    TinyCase("gpt2-conv1d", "GPT2Config", dict(reorder_and_upcast_attn=True, **SMALL_TOKENS), BIGCODE_DIMS),
    TinyCase("gptj-partial-interleaved", "GPTJConfig", dict(rotary_dim=8, **SMALL_TOKENS), BIGCODE_DIMS),
    TinyCase("gpt_neox-parallel", "GPTNeoXConfig", dict(max_position_embeddings=64)),
    TinyCase(
        "gpt_neox-sequential",
        "GPTNeoXConfig",
        dict(use_parallel_residual=False, attention_bias=False, rotary_pct=0.5, rotary_emb_base=500.0, max_position_embeddings=64),
    ),
    TinyCase("phi-qk-layernorm", "PhiConfig", dict(num_key_value_heads=2, qk_layernorm=True, max_position_embeddings=64)),
    TinyCase("opt-pre-ln", "OPTConfig", {}, OPT_DIMS),
    TinyCase("opt-post-ln-projected", "OPTConfig", dict(do_layer_norm_before=False, word_embed_proj_dim=32), OPT_DIMS),
    TinyCase("falcon-mqa-parallel", "FalconConfig", dict(max_position_embeddings=64), FALCON_DIMS),
    TinyCase(
        "falcon-new-arch-gqa",
        "FalconConfig",
        dict(new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=64),
        FALCON_DIMS,
    ),
    TinyCase(
        "falcon-alibi-sequential-bias",
        "FalconConfig",
        dict(alibi=True, parallel_attn=False, multi_query=False, bias=True, max_position_embeddings=64),
        FALCON_DIMS,
    ),
    TinyCase("bloom-alibi", "BloomConfig", {}, BLOOM_DIMS),
    TinyCase("mpt-clip-qkv", "MptConfig", dict(attn_config=dict(clip_qkv=0.25, softmax_scale=0.2), **SMALL_TOKENS), MPT_DIMS),
    # Every block standard (group 2, ffn_mult 6 -> 256 = intermediate): the reference is LlamaForCausalLM.
    TinyCase(
        "deci-uniform",
        "LlamaConfig",
        dict(num_key_value_heads=2, intermediate_size=256, **SMALL_TOKENS),
        architecture="DeciLMForCausalLM",
        builder=DECI_BUILDER,
    ),
    # (attention, ffn) per layer: GQA groups 2 and 4, ffn_mult 6 and 12 (256 and 512), no-op and linear sublayers.
    TinyCase(
        "deci-heterogeneous",
        "LlamaConfig",
        dict(
            num_hidden_layers=5,
            block_configs=[(2, 6.0), ("none", 12.0), (4, "linear"), ("linear", "none"), ("none", "none")],
            rope_scaling={**LLAMA3, "rope_theta": 50_000.0},
            **SMALL_TOKENS,
        ),
        architecture="DeciLMForCausalLM",
        builder=DECI_BUILDER,
    ),
    # TensorRT-LLM names Nemotron-NAS checkpoints NemotronNASForCausalLM: the same DeciLM layout.
    TinyCase(
        "deci-nemotron-nas-alias",
        "LlamaConfig",
        dict(num_hidden_layers=3, block_configs=[(2, 3.0), (4, "none"), ("none", 6.0)], **SMALL_TOKENS),
        architecture="NemotronNASForCausalLM",
        builder=DECI_BUILDER,
    ),
    # Remote-code layouts, checked against the native class they re-pack.
    TinyCase(
        "internlm-bias-dynamic",
        "LlamaConfig",
        dict(attention_bias=True, max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 1.0}),
        layout="internlm",
        architecture="InternLMForCausalLM",
    ),
    TinyCase(
        "internlm2-gqa-dynamic",
        "LlamaConfig",
        dict(num_key_value_heads=2, max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        layout="internlm2",
        architecture="InternLM2ForCausalLM",
    ),
    TinyCase("internlm3-gqa", "InternLM3Config", dict(num_key_value_heads=2, head_dim=16), layout="internlm3", architecture="InternLM3ForCausalLM"),
    TinyCase("baichuan-7b", "LlamaConfig", layout="baichuan", layout_options=dict(version=1), architecture="BaiChuanForCausalLM"),
    TinyCase("baichuan2-7b-normhead", "LlamaConfig", layout="baichuan", architecture="BaichuanForCausalLM"),
    TinyCase(
        "qwen-mha",
        "Qwen2Config",
        dict(num_key_value_heads=4, rope_theta=50_000.0, max_position_embeddings=64),
        layout="qwen",
        architecture="QWenLMHeadModel",
    ),
    TinyCase(
        "chatglm-mqa",
        "GlmConfig",
        dict(num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}, **GLM_TOKENS),
        layout="chatglm",
        architecture="ChatGLMModel",
    ),
    TinyCase(
        "chatglm-mha",
        "GlmConfig",
        dict(num_key_value_heads=4, head_dim=16, **GLM_TOKENS),
        layout="chatglm",
        architecture="ChatGLMForConditionalGeneration",
    ),
    TinyCase("mixtral-moe", "MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, **MOE, sliding_window=5), noise=ROUTER_NOISE),
    TinyCase(
        "qwen2_moe-shared",
        "Qwen2MoeConfig",
        dict(
            num_key_value_heads=2,
            num_hidden_layers=3,
            num_experts=4,
            **MOE,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        noise=ROUTER_NOISE,
    ),
    TinyCase(
        "qwen3_moe-sparse-step",
        "Qwen3MoeConfig",
        dict(num_key_value_heads=2, head_dim=32, num_experts=8, **MOE, moe_intermediate_size=32, decoder_sparse_step=2, norm_topk_prob=True),
        noise=ROUTER_NOISE,
    ),
    TinyCase(
        "granitemoe-multipliers",
        "GraniteMoeConfig",
        dict(num_key_value_heads=2, num_local_experts=4, **MOE, intermediate_size=32, **GRANITE_MULTIPLIERS),
        noise=ROUTER_NOISE,
    ),
    TinyCase(
        "granitemoeshared-shared",
        "GraniteMoeSharedConfig",
        dict(num_key_value_heads=2, num_local_experts=4, **MOE, intermediate_size=32, shared_intermediate_size=48, **GRANITE_MULTIPLIERS),
        noise=ROUTER_NOISE,
    ),
    TinyCase(
        "phimoe-sparsemixer-longrope",
        "PhimoeConfig",
        dict(
            num_key_value_heads=2,
            num_local_experts=4,
            **MOE,
            intermediate_size=32,
            attention_bias=True,
            lm_head_bias=True,
            router_jitter_noise=0.01,
            **SMALL_TOKENS,
            max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.2, 1.5, 2.0, 1.0, 1.1, 1.3, 1.4],
                # transformers' PhiMoE rotary always takes the short factors (only the mscale
                # follows the length); equal factors keep the comparison about the mscale switch.
                "long_factor": [1.0, 1.2, 1.5, 2.0, 1.0, 1.1, 1.3, 1.4],
                "short_mscale": 1.1,
                "long_mscale": 1.3,
                "original_max_position_embeddings": 8,
            },
        ),
        noise=ROUTER_NOISE,
    ),
    TinyCase(
        "dbrx-clip-moe",
        "DbrxConfig",
        dict(
            attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=1.0),
            **SMALL_TOKENS,
        ),
        dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=64),
        noise=ROUTER_NOISE,
    ),
    # Sliding then full layer, YaRN, sinks; swiglu_limit small enough that the clamps bite.
    TinyCase(
        "gpt_oss-sinks-sliding",
        "GptOssConfig",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            **MOE,
            intermediate_size=32,
            sliding_window=4,
            swiglu_limit=0.05,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 16, "rope_theta": 150000.0},
            **SMALL_TOKENS,
        ),
        noise={**ROUTER_NOISE, r".*\.sinks": 1.0},
    ),
    TinyCase("llama4-chunked-nope-moe", "Llama4TextConfig", LLAMA4_TEXT, noise=ROUTER_NOISE),
    # The text path of a conditional-generation checkpoint (its image path: tests/model_lib/test_vlm_families.py): top-2
    # routing, no q/k norm, llama3 rotary, no temperature tuning, every layer MoE.
    TinyCase(
        "llama4-conditional-text",
        "Llama4Config",
        dict(
            text_config={
                **DIMS,
                **LLAMA4_TEXT,
                "num_experts_per_tok": 2,
                "moe_layers": None,
                "interleave_moe_layer_step": 1,
                "use_qk_norm": False,
                "attn_temperature_tuning": False,
                "num_hidden_layers": 2,
                "no_rope_layers": [1, 0],
                "rope_parameters": {**LLAMA3, "rope_theta": 500_000.0},
            },
            vision_config=LLAMA4_VISION,
            image_token_index=VOCAB - 1,
            **SMALL_TOKENS,
        ),
        dims={},
        architecture="Llama4ForConditionalGeneration",
        model_class="Llama4ForConditionalGeneration",
        reference="language_model",
        noise=ROUTER_NOISE,
    ),
    # LLaVA's text path (its image path: tests/model_lib/test_llava.py); token 127 is its image placeholder.
    TinyCase(
        "llava-llama",
        "LlavaConfig",
        dict(text_config={**DIMS, "num_key_value_heads": 2, **SMALL_TOKENS}, vision_config=LLAVA_VISION,
             image_token_index=VOCAB - 1),
        dims={},
        architecture="LlavaForConditionalGeneration",
        model_class="LlavaForConditionalGeneration",
    ),
    # The text paths of the other LLaVA-style models (their image paths: tests/model_lib/test_vlm_families.py).
    *(TinyCase(name, config, dict(text_config={**DIMS, "num_key_value_heads": 2, **SMALL_TOKENS, **text},
                                  vision_config=vision, image_token_index=VOCAB - 1, **extra),
               dims={}, architecture=architecture, model_class=architecture)
      for name, config, architecture, vision, text, extra in (
          ("llava_next-llama", "LlavaNextConfig", "LlavaNextForConditionalGeneration", LLAVA_VISION, {},
           dict(image_grid_pinpoints=[[32, 64]])),
          ("llava_onevision-qwen2", "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration",
           {**LLAVA_VISION, "model_type": "siglip_vision_model", "vision_use_head": False},
           {"model_type": "qwen2"}, dict(image_grid_pinpoints=[[32, 64]], video_token_index=VOCAB - 2)),
          ("mistral3-mistral", "Mistral3Config", "Mistral3ForConditionalGeneration",
           {**LLAVA_VISION, "model_type": "pixtral", "head_dim": 8}, {"model_type": "mistral"},
           dict(tie_word_embeddings=False)),
          ("internvl-qwen2", "InternVLConfig", "InternVLForConditionalGeneration",
           {**LLAVA_VISION, "model_type": "internvl_vision"}, {"model_type": "qwen2"},
           dict(tie_word_embeddings=False, image_token_id=VOCAB - 1)),
          ("gemma3-vl", "Gemma3Config", "Gemma3ForConditionalGeneration",
           {**LLAVA_VISION, "model_type": "siglip_vision_model", "vision_use_head": False},
           {"model_type": "gemma3_text", "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"]},
           dict(mm_tokens_per_image=4, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)),
      )),
    # Mllama's text path: the cross-attention layer (1) is skipped without images (the image path:
    # tests/model_lib/test_mllama.py); its <|image|> token (VOCAB) lies past the output vocabulary.
    TinyCase(
        "mllama-text",
        "MllamaConfig",
        dict(text_config={**DIMS, "num_hidden_layers": 3, "num_key_value_heads": 2, **SMALL_TOKENS,
                          "cross_attention_layers": [1]},
             vision_config=MLLAMA_VISION, image_token_index=VOCAB),
        dims={},
        architecture="MllamaForConditionalGeneration",
        model_class="MllamaForConditionalGeneration",
    ),
    # Qwen-VL text paths (M-RoPE with 1D positions; the image path: tests/model_lib/test_qwen_vl.py).
    *(TinyCase(
        f"{name}-text",
        config_class,
        dict(text_config={**DIMS, "num_key_value_heads": 2, **SMALL_TOKENS,
                          "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}, **text},
             vision_config=vision, image_token_id=VOCAB - 1, vision_start_token_id=VOCAB - 2,
             vision_end_token_id=VOCAB - 3, video_token_id=VOCAB - 4),
        dims={},
        architecture=architecture,
        model_class=architecture,
    ) for name, config_class, architecture, vision, text in (
        ("qwen2-vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", QWEN2_VL_VISION, {}),
        ("qwen2_5-vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL_VISION, {}),
        ("qwen3-vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", QWEN3_VL_VISION, dict(head_dim=16)),
        ("qwen3-vl-moe", "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", QWEN3_VL_VISION,
         dict(head_dim=16, num_experts=4, moe_intermediate_size=48, **MOE)),
    )),
    # GLM-4.1V's text path: GLM-4's sandwich norms, M-RoPE sections over the rotated half of each head.
    TinyCase(
        "glm4v-text",
        "Glm4vConfig",
        dict(text_config={**DIMS, "num_key_value_heads": 2, **SMALL_TOKENS,
                          "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                              "partial_rotary_factor": 0.5}},
             vision_config=GLM4V_VISION, image_token_id=VOCAB - 1, image_start_token_id=VOCAB - 2,
             image_end_token_id=VOCAB - 3, video_token_id=VOCAB - 4),
        dims={},
        architecture="Glm4vForConditionalGeneration",
        model_class="Glm4vForConditionalGeneration",
    ),
    # Remote code with an own reference (the case's dims and overrides are its config.json fields).
    TinyCase("grok1-softcap-moe", "PretrainedConfig", dict(intermediate_size=32), architecture="Grok1ModelForCausalLM",
             builder=GROK_BUILDER),
    # Layer 0 dense, layers 1 and 3 MoE beside the residual MLP (parallel_attn_mlp_res), layer 2 dense.
    TinyCase("arctic-residual-moe", "PretrainedConfig", dict(intermediate_size=32, num_hidden_layers=4),
             architecture="ArcticForCausalLM", builder=ARCTIC_BUILDER),
    # SDAR: Qwen3 (GQA, q/k norm, head_dim 32 != hidden / heads, untied head as published) under block-causal attention,
    # blocks of 4 positions (SEQ_LEN spans 3); the mask token is the last id of the vocabulary.
    TinyCase("sdar-block-causal", "Qwen3Config",
             dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, block_size=4, mask_token_id=VOCAB - 1,
                  **SMALL_TOKENS),
             architecture="SDARForCausalLM", builder=SDAR_BUILDER),
    TinyCase(
        "glm4_moe-grouped-sigmoid",
        "Glm4MoeConfig",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            n_routed_experts=8,
            **MOE,
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            use_qk_norm=True,
            attention_bias=True,
            **SMALL_TOKENS,
        ),
        noise={**ROUTER_NOISE, r".*\.e_score_correction_bias": 0.3},
    ),
    # DeepSeek: MLA (kv latent rank 16, rope part 8) with MoE past `first_k_dense_replace`; 8 experts.
    # V2 greedy softmax router, q through a rank-32 bottleneck, MLP biases, routed scaling.
    TinyCase(
        "deepseek_v2-greedy-qlora",
        "DeepseekV2Config",
        dict(**MLA_DIMS, **DEEPSEEK_MOE, q_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, mlp_bias=True,
             topk_method="greedy", routed_scaling_factor=1.5),
        noise=ROUTER_NOISE,
    ),
    # V2-Lite style: plain q_proj, v heads wider than qk, biases, group-limited router (4 groups, best 2), YaRN with mscale.
    TinyCase(
        "deepseek_v2-lite-grouped-yarn",
        "DeepseekV2Config",
        dict(**MLA_DIMS, **{**DEEPSEEK_MOE, "num_experts_per_tok": 3}, q_lora_rank=None, qk_nope_head_dim=8, v_head_dim=24,
             attention_bias=True, topk_method="group_limited_greedy", n_group=4, topk_group=2,
             max_position_embeddings=32, rope_parameters=dict(DEEPSEEK_YARN, mscale=0.9, mscale_all_dim=0.7)),
        noise=ROUTER_NOISE,
    ),
    # DeepSeek-MoE style: fine-grained experts (16 of width 16, top 4), two shared experts, 3 layers, greedy;
    # moe_layer_freq as DeepSeek's configs carry it (transformers ignores it: every layer past the first is MoE).
    TinyCase(
        "deepseek_v2-moe-fine-grained",
        "DeepseekV2Config",
        dict(**MLA_DIMS, **{**DEEPSEEK_MOE, "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 16,
                            "n_shared_experts": 2},
             num_hidden_layers=3, q_lora_rank=None, qk_nope_head_dim=16, v_head_dim=16, moe_layer_freq=2),
        noise=ROUTER_NOISE,
    ),
    # V3: sigmoid router with correction bias in 4 groups (best 2), renormalised, scaled 2.5; YaRN with mscale.
    TinyCase(
        "deepseek_v3-noaux-yarn",
        "DeepseekV3Config",
        dict(**MLA_DIMS, **DEEPSEEK_MOE, q_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=32,
             rope_parameters=dict(DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=0.8)),
        noise={**ROUTER_NOISE, r".*\.e_score_correction_bias": 0.3},
    ),
    # V3 with rotate-half rope (rope_interleave False), plain q_proj, no renormalisation, every layer MoE.
    TinyCase(
        "deepseek_v3-halfrope-allmoe",
        "DeepseekV3Config",
        dict(**MLA_DIMS, **{**DEEPSEEK_MOE, "first_k_dense_replace": 0}, q_lora_rank=None, qk_nope_head_dim=8,
             v_head_dim=16, n_group=2, topk_group=1, norm_topk_prob=False, rope_interleave=False, attention_bias=True),
        noise={**ROUTER_NOISE, r".*\.e_score_correction_bias": 0.3},
    ),
    # Tied head, dt rank ceil(64 / 16) = 4, conv bias.
    TinyCase("mamba-tied", "MambaConfig", dims=MAMBA_DIMS),
    # Untied head, no conv bias.
    TinyCase("mamba2-groups-chunked", "Mamba2Config", dims=MAMBA2_DIMS, overrides=dict(use_conv_bias=False)),
    # Granite 4.0: Mamba-2 (4 heads of 32 in 2 groups, chunks of 5), attention (GQA, NoPE) and Mamba-2 again;
    # MoE (4 experts, top-2) beside a shared MLP in every layer; Granite multipliers.
    TinyCase(
        "granitemoehybrid-nope",
        "GraniteMoeHybridConfig",
        dict(num_hidden_layers=3, num_key_value_heads=2, num_local_experts=4, **MOE, shared_intermediate_size=48,
             layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
             mamba_d_head=32, mamba_chunk_size=5, position_embedding_type="nope", **GRANITE_MULTIPLIERS,
             **SMALL_TOKENS),
        noise=ROUTER_NOISE,
    ),
    TinyCase("recurrentgemma-local-mqa", "RecurrentGemmaConfig", RECURRENT_GEMMA),
    # Qwen3-Next: Gated DeltaNet (2 q/k heads of 16 shared by 4 value heads of 8), gated attention
    # (GQA, head_dim 16, rotary on a quarter of it), DeltaNet again; MoE (4 experts, top-2, gated
    # shared expert) but a dense MLP on the last layer.
    TinyCase(
        "qwen3_next-hybrid",
        "Qwen3NextConfig",
        dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=8, num_experts=4, **MOE, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, mlp_only_layers=[2],
             layer_types=["linear_attention", "full_attention", "linear_attention"], **SMALL_TOKENS),
        noise=ROUTER_NOISE,
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# One case per registered architecture, for the costlier sharded and bf16 runs.
ONE_PER_ARCHITECTURE = [
    "llama-gqa",
    "mistral-sliding",
    "qwen2-sliding",
    "qwen3-qknorm",
    "granite-multipliers",
    "gemma3-local-global",
    "phi3-longrope-partial",
    "gpt_bigcode-mqa",
    "gemma-mqa",
    "gemma2-softcaps",
    "starcoder2-sliding",
    "nemotron-partial",
    "exaone4-hybrid",
    "glm-partial",
    "glm4-post-norms",
    "cohere-qknorm",
    "minicpm3-mla-longrope",
    "gpt2-conv1d",
    "gptj-partial-interleaved",
    "gpt_neox-parallel",
    "phi-qk-layernorm",
    "opt-post-ln-projected",
    "falcon-new-arch-gqa",
    "bloom-alibi",
    "mpt-clip-qkv",
    "deci-heterogeneous",
    "internlm-bias-dynamic",
    "internlm2-gqa-dynamic",
    "internlm3-gqa",
    "baichuan-7b",
    "baichuan2-7b-normhead",
    "qwen-mha",
    "chatglm-mqa",
    "chatglm-mha",
    "mixtral-moe",
    "qwen2_moe-shared",
    "qwen3_moe-sparse-step",
    "granitemoe-multipliers",
    "granitemoeshared-shared",
    "phimoe-sparsemixer-longrope",
    "dbrx-clip-moe",
    "gpt_oss-sinks-sliding",
    "glm4_moe-grouped-sigmoid",
    "deepseek_v2-lite-grouped-yarn",
    "deepseek_v3-noaux-yarn",
    "llama4-chunked-nope-moe",  # also stands for Llama4ForConditionalGeneration: the same text model
    "grok1-softcap-moe",
    "arctic-residual-moe",
    "mamba-tied",
    "mamba2-groups-chunked",
    "granitemoehybrid-nope",
    "recurrentgemma-local-mqa",
    "qwen3_next-hybrid",
    "sdar-block-causal",
]

# The cases that stand for the others in `make test` (CI) where a table runs every architecture through a
# costly path (the engine, bfloat16 loading): one per kind of attention, cache and layer the serving path
# handles apart. The other rows carry the `slow` mark: `make test-all` runs them.
CI_ARCHITECTURES = [
    "llama-gqa",  # plain GQA
    "gemma2-softcaps",  # logit soft-capping
    "gemma3-local-global",  # per-layer sliding / global windows
    "phi3-longrope-partial",  # length-dependent rotary, partial rotary
    "internlm2-gqa-dynamic",  # dynamic NTK rotary
    "bloom-alibi",  # ALiBi
    "chatglm-mqa",  # remote-code layout, 2D rotary
    "deci-heterogeneous",  # layers of different shapes
    "gpt_oss-sinks-sliding",  # attention sinks
    "mixtral-moe",  # MoE
    "deepseek_v3-noaux-yarn",  # MLA latent pages
    "llama4-chunked-nope-moe",  # chunked attention, NoPE layers
    "mamba2-groups-chunked",  # SSD state
    "granitemoehybrid-nope",  # Mamba-2 / attention hybrid
    "recurrentgemma-local-mqa",  # RG-LRU state
    "qwen3_next-hybrid",  # gated delta state
]


def ci_rows(rows: list, covered: tuple[str, ...] = ()) -> list:
    """`rows` (case names, or tuples that start with one) as pytest parameters, those whose case is outside
    CI_ARCHITECTURES (or in `covered`, which another CI test runs through the same path) marked `slow`."""
    import pytest

    def ci(row) -> bool:
        case = row[0] if isinstance(row, tuple) else row
        return case in CI_ARCHITECTURES and case not in covered

    return [row if ci(row) else pytest.param(*(row if isinstance(row, tuple) else (row,)), marks=pytest.mark.slow)
            for row in rows]
MOE_CASES = ["mixtral-moe", "qwen2_moe-shared", "qwen3_moe-sparse-step", "granitemoe-multipliers", "granitemoeshared-shared",
             "phimoe-sparsemixer-longrope", "dbrx-clip-moe",
             "gpt_oss-sinks-sliding", "glm4_moe-grouped-sigmoid", "deepseek_v2-lite-grouped-yarn", "deepseek_v3-noaux-yarn",
             "llama4-chunked-nope-moe", "grok1-softcap-moe", "arctic-residual-moe"]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer():
    """A character-level tokenizer over exactly VOCAB ids, built offline with `tokenizers`.

    Ids 0-2 are <unk>, <s>, </s>; then printable ASCII; the rest are multi-character
    pieces that encoding never produces but decoding must join correctly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)]
    extra = ["\n", "th", "he", "in", "er", "an", " t", "e ", "on", "at", "en", "nd", "ti", "es", "or"]
    extra += ["of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io"]
    pieces = (pieces + extra)[:VOCAB]
    assert len(pieces) == VOCAB
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_checkpoint(case: TinyCase, folder: Path):
    """Build the transformers model (seed 0) and save it with a tiny tokenizer; return the model."""
    import importlib

    import torch

    if case.builder is not None:
        module, function = case.builder.split(":")
        return getattr(importlib.import_module(module), function)(case, folder)
    torch.manual_seed(0)
    config = case.hf_config()
    if case.model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        model = getattr(transformers, case.model_class)(config).float().eval()
    # Random init leaves norms at 1 / 0; perturb every parameter so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        persistent = set(model.state_dict())
        tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
        for pattern, std in case.noise.items():
            for name, t in tensors:
                if re.fullmatch(pattern, name):
                    t.add_(torch.randn_like(t) * std)
    model.save_pretrained(folder)
    if case.layout is not None:
        from tests.remote_layouts import write

        write(case.layout, model, folder, case.architecture, **case.layout_options)
    if case.dims.get("vocab_size", VOCAB) == VOCAB:
        build_tokenizer().save_pretrained(folder)
    return model if case.reference is None else getattr(model, case.reference)


def _reset_dynamic_rope(model) -> None:
    """transformers' dynamic NTK caches the longest length seen across calls; start each call fresh."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.inv_freq.copy_(module.original_inv_freq)
            module.max_seq_len_cached = module.original_max_seq_len


def hf_logits(model, input_ids: np.ndarray, **forward_options: Any) -> np.ndarray:
    import torch

    _reset_dynamic_rope(model)
    with torch.no_grad():
        return model(torch.as_tensor(input_ids), **forward_options).logits.float().numpy()


def random_ids(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, size=(batch, length)).astype(np.int32)


def padded_batch(seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Two rows of SEQ_LEN: one left-padded, one right-padded; plus each row's real span."""
    ids = random_ids(2, SEQ_LEN, seed)
    mask = np.ones_like(ids)
    spans = [(3, SEQ_LEN), (0, SEQ_LEN - 2)]
    for row, (start, end) in enumerate(spans):
        mask[row, :start] = 0
        mask[row, end:] = 0
        ids[row, mask[row] == 0] = 0
    return ids, mask, spans


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel * max(1, max |ref|): tight relative to the logit scale."""
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(np.asarray(ours) - ref).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} x logit scale {scale:.3g}"
