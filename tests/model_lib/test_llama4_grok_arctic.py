"""Llama 4, Grok-1 and Arctic beyond the shared tables (parity, generation, sharding rows live
in tests/tiny_models.py): every quirk of their tiny cases moves the logits, the conditional
Llama 4 checkpoint's vision tower, LoRA target names, and the options refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import model_lib
from model_lib import CausalLM
from model_lib.lora import LoraConfig, apply_lora
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids

# name -> (case, ModelConfig changes that drop one quirk but keep every parameter)
QUIRKS = {
    "llama4-chunked-attention": ("llama4-chunked-nope-moe",
                                 dict(attention_chunk_size=None, layer_types=("full_attention",) * 3)),
    "llama4-nope-layer": ("llama4-chunked-nope-moe", dict(nope_layers=())),
    "llama4-temperature-tuning": ("llama4-chunked-nope-moe", dict(attn_temperature_floor_scale=None)),
    "llama4-qk-l2-norm": ("llama4-chunked-nope-moe", dict(qk_norm="none")),
    "llama4-expert-input-scaling": ("llama4-chunked-nope-moe", dict(moe_scale_input=False)),
    "grok1-attention-softcap": ("grok1-softcap-moe", dict(attn_logit_softcap=None)),
    "grok1-output-multiplier": ("grok1-softcap-moe", dict(logit_multiplier=1.0)),
    "arctic-renormalised-top2": ("arctic-residual-moe", dict(norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", sorted(QUIRKS))
def test_each_quirk_changes_the_logits(name, tiny_checkpoint, forward):
    """The tiny cases exercise each quirk: the same weights without it miss the reference."""
    case, changes = QUIRKS[name]
    folder, reference = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    without = nnx.eval_shape(lambda: CausalLM(model.config.replace(**changes), rngs=nnx.Rngs(0)))
    nnx.update(without, nnx.state(model))
    ids = random_ids(1, SEQ_LEN, seed=31)
    expected = hf_logits(reference, ids)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), expected)
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_logits_close(forward(without, ids, np.ones_like(ids)), expected)


def test_conditional_checkpoint_serves_its_text_path(tiny_checkpoint, forward, tmp_path):
    """Text-only prompts through the vision-language model (its tower loaded beside the language model); export
    writes every tensor back under the checkpoint's names."""
    folder, reference = tiny_checkpoint("llama4-conditional-text")
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("multi_modal_projector.") for n in names)
    model = model_lib.from_pretrained(folder)
    assert model.config.architecture == "Llama4ForConditionalGeneration" and model.config.num_layers == 2
    assert model.config.multimodal is not None

    model_lib.save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        saved = set(f.keys())
    assert saved == set(names)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Llama4ForConditionalGeneration"]
    ids = random_ids(1, SEQ_LEN, seed=32)
    assert_logits_close(forward(model_lib.from_pretrained(tmp_path), ids, np.ones_like(ids)), hf_logits(reference, ids))


# case -> (layer, the HF module paths `all-linear` adapts in it): attention and dense/shared MLPs
# under the checkpoint's own names; routers and stacked experts are not linear layers.
LORA_TARGETS = {
    "llama4-chunked-nope-moe": (1, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
                                    "feed_forward.shared_expert.down_proj"}),
    "llama4-conditional-text": (0, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
                                    "feed_forward.shared_expert.down_proj"}),
    "grok1-softcap-moe": (0, {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}),
    "arctic-residual-moe": (1, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "residual_mlp.w1", "residual_mlp.w2", "residual_mlp.w3"}),
}


@pytest.mark.parametrize("case", sorted(LORA_TARGETS))
def test_lora_targets_use_the_checkpoint_names(case, tiny_checkpoint):
    folder, _ = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    layer, expected = LORA_TARGETS[case]
    prefix = ("language_model." if case == "llama4-conditional-text" else "") + f"model.layers.{layer}."
    groups = apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert {name.removeprefix(prefix) for name in groups if name.startswith(prefix)} == expected
    assert not any(name.endswith("lm_head") for name in groups)


def test_dense_layers_take_their_own_names(tiny_checkpoint):
    """Llama 4's dense layer is `feed_forward.*` of width intermediate_size_mlp; Arctic's `block_sparse_moe.mlp.w*`."""
    model = model_lib.from_pretrained(tiny_checkpoint("llama4-chunked-nope-moe")[0])
    groups = apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj"]))
    assert "model.layers.0.feed_forward.gate_proj" in groups
    assert groups["model.layers.0.feed_forward.gate_proj"][0][1].out_features == 96
    model = model_lib.from_pretrained(tiny_checkpoint("arctic-residual-moe")[0])
    assert "model.layers.0.block_sparse_moe.mlp.w1" in apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["w1"]))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sliding_window", 16, "sliding_window=16 is not supported"),
    ("moe_layer_frequency", 0, "moe_layer_frequency=0"),
])
def test_arctic_refuses_options_it_does_not_reproduce(key, value, message, tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("arctic-residual-moe")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=message):
        model_lib.load_config(tmp_path)


# (case, engine options): issue 18's architectures under scheduling pressure (DeepSeek-V3's latent pages:
# tests/model_lib/test_mla_latent_cache.py; MiniCPM3 here, its prefill chunks expanded). DeepSeek-V2-Lite (no q low rank, interleaved rope) sends its
# chunks of >= 4 tokens through MLA's expanded form; its YaRN covers 32 positions, transformers runs past them too.
MLA_PRESSURE = dict(mla_expanded_prefill_tokens=4, allow_long_max_model_len=True)
PRESSURE_CASES = [("llama4-chunked-nope-moe", {}), ("deepseek_v2-lite-grouped-yarn", MLA_PRESSURE),
                  ("grok1-softcap-moe", {}), ("arctic-residual-moe", {}), ("minicpm3-mla-longrope", MLA_PRESSURE),
                  ("deci-heterogeneous", {})]


@pytest.mark.parametrize("case,options", PRESSURE_CASES)
def test_generates_under_preemption_chunked_prefill_and_prefix_hits(case, options, tiny_checkpoint):
    """Prefill chunks of 16 tokens (Llama 4: crossing attention chunks of 4) beside decode rows, a 10-page pool
    that preempts, and prompts sharing a 20-token prefix that reuse its pages; tokens equal the reference's."""
    import torch

    from serving import LLM, SamplingParams
    from tests.serving.helpers import prompts, token_prompts

    folder, hf_model = tiny_checkpoint(case)
    shared = prompts((20,), seed=1)[0]
    prompt_ids = [shared + p for p in prompts((2, 5, 9), seed=2)] + prompts((3, 26), seed=3)
    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist() for p in prompt_ids]
    llm = LLM(folder, max_model_len=40, num_pages=10, page_size=4, max_num_batched_tokens=16, **options)
    outputs = llm.generate(token_prompts(prompt_ids), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.pool.prefix_hits > 0
    assert llm.engine.pool.all_free()
