"""DeciLM / Nemotron-NAS (reference "own"): invariants, hand-computed cases, and the
torch reference of tests/deci_reference.py.

The shared tables cover logits (`deci-uniform` against LlamaForCausalLM,
`deci-heterogeneous` against the per-layer reference), greedy generation, 8-device
sharding and bf16 of `deci-heterogeneous`; this file adds what is particular to the
heterogeneous stack.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import model_lib
from model_lib.config import ModelConfig
from model_lib.families.deci import deci_config, ffn_mult_to_intermediate_size
from model_lib.families.llama import llama_config
from tests.deci_reference import block_config, write_deci_checkpoint
from tests.tiny_models import CASES_BY_NAME, SMALL_TOKENS, DIMS, SEQ_LEN, assert_logits_close, hf_logits, random_ids


def test_ffn_mult_to_intermediate_size():
    """int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256."""
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672  # exact multiple: Llama-3-70B's MLP
    assert ffn_mult_to_intermediate_size(2.625, 8192) == 14336
    assert ffn_mult_to_intermediate_size(1.3125, 8192) == 7168
    assert ffn_mult_to_intermediate_size(6.0, 64) == 256  # 2 * 6 * 64 / 3 = 256
    assert ffn_mult_to_intermediate_size(6.01, 64) == 256  # int(256.43) = 256
    assert ffn_mult_to_intermediate_size(6.03, 64) == 512  # int(257.28) = 257 -> 512
    assert ffn_mult_to_intermediate_size(1.0, 64) == 256  # int(42.67) = 42 -> 256
    assert ffn_mult_to_intermediate_size(12.0, 64) == 512


def test_block_configs_become_per_layer_fields(tiny_checkpoint):
    folder, _ = tiny_checkpoint("deci-heterogeneous")
    config, family = model_lib.load_config(folder)
    assert family.remote_code and family.name == "deci"
    assert config.layer_attention == ("attention", "none", "attention", "linear", "none")
    assert config.layer_mlp == ("mlp", "mlp", "linear", "none", "none")
    assert config.layer_num_kv_heads == (2, 0, 1, 0, 0)  # 4 heads in groups of 2 and 4
    assert config.layer_intermediate_sizes == (256, 512, 0, 0, 0)  # ffn_mult 6 and 12 on hidden 64
    assert [config.layer_cache_kv_heads(i) for i in range(5)] == [2, 0, 1, 0, 0]
    # Legacy rotary keys of the remote config.json: llama3 scaling on rope_theta 50000.
    assert (config.rope.kind, config.rope.theta, config.rope.factor) == ("llama3", 50_000.0, 8.0)
    assert config.eos_token_ids == (2,)

    model = model_lib.from_pretrained(folder)
    layers = model.model.layers
    assert layers[1].self_attn is None and layers[1].input_layernorm is None
    assert not hasattr(layers[3], "post_attention_layernorm") and layers[3].mlp is None
    assert layers[2].self_attn.k_proj.kernel.shape == (64, 16) and layers[1].mlp.up_proj.kernel.shape == (64, 512)


def test_uniform_blocks_give_the_llama_config(tiny_checkpoint):
    folder, llama = tiny_checkpoint("deci-uniform")
    config, _ = model_lib.load_config(folder)
    expected = llama_config(llama.config, "DeciLMForCausalLM").replace(family="deci")
    assert config == expected and config.layer_num_kv_heads == () and config.layer_attention == ()


def _remote(fields: dict) -> transformers.PretrainedConfig:
    base = dict(DIMS, num_key_value_heads=None, intermediate_size=None, max_position_embeddings=64, rope_theta=1e4)
    return transformers.PretrainedConfig.from_dict({**base, **fields})


def test_decilm_7b_kv_heads_per_layer():
    config = deci_config(_remote({"num_key_value_heads_per_layer": [4, 1], "intermediate_size": 96}), "DeciLMForCausalLM")
    assert config.layer_num_kv_heads == (4, 1) and config.intermediate_size == 96 and config.layer_attention == ()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"attention": {"n_heads_in_group": 2, "window_length": 8}}, r"block_configs\[1\]\.attention\.window_length = 8"),
        ({"attention": {"n_heads_in_group": 2, "num_sink_tokens": 4}}, r"attention\.num_sink_tokens = 4 is not"),
        ({"attention": {"n_heads_in_group": 3}}, "n_heads_in_group = 3 does not divide 4 heads"),
        ({"parallel_blocks": [{}]}, r"block_configs\[1\]\.parallel_blocks"),
        ({"ffn": {"ffn_mult": 1.0, "moe": {"num_experts": 2}}}, r"ffn\.moe"),
        ({"ffn": {"ffn_mult": None}}, r"block_configs\[1\]\.ffn needs ffn_mult"),
    ],
)
def test_unsupported_block_options_are_named(change, match):
    blocks = [block_config(2, 6.0), {**block_config(2, 6.0), **change}]
    with pytest.raises(ValueError, match=match):
        deci_config(_remote({"block_configs": blocks}), "DeciLMForCausalLM")
    with pytest.raises(ValueError, match="needs block_configs or num_key_value_heads_per_layer"):
        deci_config(_remote({}), "DeciLMForCausalLM")


def test_no_op_sublayers_equal_llama_with_zeroed_output_projections(tmp_path, forward):
    """x + o_proj(...) with o_proj = 0 is x: a no-op attention; likewise down_proj = 0 for a no-op MLP.

    The Llama keeps the now-dead projections and norms; the DeciLM checkpoint drops them.
    """
    llama = transformers.LlamaConfig(**{**DIMS, "num_hidden_layers": 3, "num_key_value_heads": 2, "intermediate_size": 256, **SMALL_TOKENS})
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(llama).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        hf_model.model.layers[0].self_attn.o_proj.weight.zero_()
        hf_model.model.layers[0].mlp.down_proj.weight.zero_()
        hf_model.model.layers[1].self_attn.o_proj.weight.zero_()
        hf_model.model.layers[2].mlp.down_proj.weight.zero_()
    dropped = ("layers.0.self_attn.", "layers.0.input_layernorm", "layers.0.mlp.", "layers.0.post_attention_layernorm")
    dropped += ("layers.1.self_attn.", "layers.1.input_layernorm", "layers.2.mlp.", "layers.2.post_attention_layernorm")
    tensors = {k: v for k, v in hf_model.state_dict().items() if not any(d in k for d in dropped)}
    write_deci_checkpoint(tmp_path, tensors, llama, [("none", "none"), ("none", 6.0), (2, "none")])

    model = model_lib.from_pretrained(tmp_path)
    ids = random_ids(2, SEQ_LEN, seed=21)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), hf_logits(hf_model, ids))


def test_linear_sublayers_by_hand():
    """Layer 0: x + rms(x) g0 @ A, then + rms(.) g1 @ M (linear attention and MLP); layer 1 is empty."""
    config = ModelConfig(
        architecture="DeciLMForCausalLM",
        family="deci",
        vocab_size=32,
        hidden_size=8,
        intermediate_size=0,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        head_dim=4,
        max_position_embeddings=16,
        layer_types=("full_attention",) * 2,
        layer_attention=("linear", "none"),
        layer_mlp=("linear", "none"),
    )
    model = model_lib.from_config(config, seed=0)
    rng = np.random.RandomState(0)
    layer = model.model.layers[0]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
        norm.weight.set_value(jnp.asarray(rng.rand(8) + 0.5, jnp.float32))
    param = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    rms = lambda x, g: x / np.sqrt((x**2).mean(-1, keepdims=True) + config.norm_eps) * g  # noqa: E731

    ids = rng.randint(0, 32, size=(2, 5)).astype(np.int32)
    x = param(model.model.embed_tokens.weight)[ids]
    x = x + rms(x, param(layer.input_layernorm.weight)) @ param(layer.self_attn.linear_attn.kernel)
    x = x + rms(x, param(layer.post_attention_layernorm.weight)) @ param(layer.mlp.linear_mlp.kernel)
    expected = rms(x, param(model.model.norm.weight)) @ param(model.lm_head.kernel)
    assert_logits_close(np.asarray(model(ids)), expected, rel=1e-5)
    # No mixing across tokens: the second position alone gives the same logits.
    assert_logits_close(np.asarray(model(ids[:, 1:2]))[:, 0], expected[:, 1], rel=1e-5)


def test_save_reload_round_trip(tiny_checkpoint, tmp_path, forward):
    """Saving writes back the checkpoint's tensors and its own remote config.json."""
    folder, reference = tiny_checkpoint("deci-heterogeneous")
    model = model_lib.from_pretrained(folder)
    model_lib.save_pretrained(model, tmp_path / "saved")
    original, saved = load_file(folder / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert written.pop("dtype") == "float32" and source.pop("torch_dtype") == "float32"
    assert written == source
    ids = random_ids(2, SEQ_LEN, seed=22)
    assert_logits_close(forward(model_lib.from_pretrained(tmp_path / "saved"), ids, np.ones_like(ids)), hf_logits(reference, ids))


def test_kv_pages_follow_each_layers_kv_heads(tiny_checkpoint):
    from serving.engine.runner import ModelRunner

    folder, _ = tiny_checkpoint("deci-heterogeneous")
    model = model_lib.from_pretrained(folder)
    runner = ModelRunner(model, num_pages=6, page_size=4, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=24)
    # Layers 0 and 2 keep (k, v) pages with 2 and 1 kv heads; the others none (the last two scan as one run).
    assert [a.shape for a in jax.tree.leaves(runner.kv_caches)] == [(2, 6, 4, 16)] * 2 + [(1, 6, 4, 16)] * 2
    assert runner.kv_cache_bytes == 2 * (2 + 1) * 6 * 4 * 16 * 4


def test_lora_on_linear_sublayers_merges_into_the_reference(tiny_checkpoint, tmp_path, forward):
    """all-linear LoRA reaches linear_attn / linear_mlp; merged and saved, the torch reference agrees."""
    from model_lib.lora import LoraConfig, apply_lora, linear_layers, load_peft_adapter, merge_lora, save_peft_adapter

    folder, reference = tiny_checkpoint("deci-heterogeneous")
    model = model_lib.from_pretrained(folder)
    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    groups = apply_lora(model, config)
    assert {"model.layers.3.self_attn.linear_attn", "model.layers.2.mlp.linear_mlp"} <= set(groups)
    assert not any(name.startswith(("model.layers.1.self_attn", "model.layers.4.")) for name in groups)
    rng = np.random.RandomState(0)
    for layer in linear_layers(model).values():
        if layer.lora_b is not None:
            layer.lora_b.set_value(jnp.asarray(rng.randn(*layer.lora_b.shape) * 0.2, jnp.float32))
    ids = random_ids(2, SEQ_LEN, seed=23)
    adapted = np.asarray(forward(model, ids, np.ones_like(ids)))
    assert np.abs(adapted - hf_logits(reference, ids)).max() > 1e-3

    save_peft_adapter(model, config, tmp_path / "adapter", str(folder))
    fresh = model_lib.from_pretrained(folder)
    load_peft_adapter(fresh, tmp_path / "adapter")
    assert_logits_close(forward(fresh, ids, np.ones_like(ids)), adapted)

    merge_lora(model)
    model_lib.save_pretrained(model, tmp_path / "merged")
    merged = {k: torch.from_numpy(v) for k, v in load_file(tmp_path / "merged" / "model.safetensors").items()}
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    try:
        reference.load_state_dict(merged, strict=False)
        assert_logits_close(adapted, hf_logits(reference, ids))
    finally:
        reference.load_state_dict(original)


def test_uniform_deci_generates_as_llama(tiny_checkpoint):
    from serving import LLM, SamplingParams
    from tests.serving.helpers import MAX_TOKENS, hf_greedy, prompts, token_prompts

    folder, llama = tiny_checkpoint("deci-uniform")
    prompt_ids = prompts(lengths=(5, 17))
    llm = LLM(folder, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, page_size=4)
    outputs = llm.generate(token_prompts(prompt_ids), SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(llama, p) for p in prompt_ids]
