"""LoRA through the shared Linear: PEFT parity both ways, merging, NF4."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import model_lib
from model_lib.lora import (
    LoraConfig,
    apply_lora,
    linear_layers,
    load_peft_adapter,
    merge_lora,
    param_bytes,
    quantize_model_nf4,
    save_peft_adapter,
)
from model_lib.quantization import dequantize_nf4, quantize_nf4
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, padded_batch, random_ids


def _randomise_b(model, seed=0):
    rng = np.random.RandomState(seed)
    for layer in linear_layers(model).values():
        if layer.lora_b is not None:
            layer.lora_b.set_value(jnp.asarray(rng.randn(*layer.lora_b.shape) * 0.2, jnp.float32))


@pytest.mark.parametrize(
    "case,targets,rslora",
    [
        ("llama-gqa", ["q_proj", "v_proj"], False),
        ("phi3-sliding", "all-linear", True),
        ("gpt_bigcode-mha-untied", ["c_attn", "c_fc"], False),
        ("gpt2-conv1d", ["c_attn", "c_proj"], False),  # Conv1D modules, fused [q | k | v]
        ("falcon-new-arch-gqa", "all-linear", False),  # qkv fused per KV group
        ("mixtral-moe", ["q_proj", "k_proj", "v_proj", "o_proj"], False),
        ("qwen2_moe-shared", "all-linear", False),
        # MLA projections. (PEFT 0.21 on transformers 5 turns MLP names into targets on the fused 3-D experts
        # of MoE models, which our per-expert stacks do not take: no MLP names here.)
        ("deepseek_v2-greedy-qlora", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], False),
        ("deepseek_v3-noaux-yarn", ["q_b_proj", "kv_a_proj_with_mqa", "o_proj"], True),
        # State-space mixers (PEFT's Mamba targets), and Granite 4.0's mixers beside its attention.
        # PEFT refuses out_proj and conv1d on Mamba, and transformers reads dt_proj.weight past its adapter.
        ("mamba-tied", ["in_proj", "x_proj"], False),
        ("granitemoehybrid-nope", ["in_proj", "out_proj", "q_proj", "v_proj"], False),
        # RecurrentGemma's recurrent block and MLP (biased projections) beside its local attention.
        ("recurrentgemma-local-mqa", ["linear_x", "linear_y", "linear_out", "q_proj", "o_proj", "down_proj"], False),
    ],
)
def test_our_adapter_in_peft_gives_our_logits(case, targets, rslora, tiny_checkpoint, tmp_path, forward):
    from peft import PeftModel

    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora)
    apply_lora(model, config)
    _randomise_b(model)
    ids = random_ids(2, SEQ_LEN, seed=11)
    ours = forward(model, ids, np.ones_like(ids))
    save_peft_adapter(model, config, tmp_path / "adapter", str(folder))
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    try:
        assert_logits_close(ours, hf_logits(peft_model, ids))
    finally:
        peft_model.unload()


def test_peft_made_adapter_loads_here_and_merges(tiny_checkpoint, tmp_path, forward):
    import torch
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    folder, hf_model = tiny_checkpoint("qwen3-qknorm")
    torch.manual_seed(1)
    peft_model = get_peft_model(hf_model, PeftLoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids(2, SEQ_LEN, seed=12)
    expected = hf_logits(peft_model.eval(), ids)
    peft_model.unload()

    model = model_lib.from_pretrained(folder)
    config = load_peft_adapter(model, tmp_path / "peft")
    assert config.r == 4 and config.scale == 4.0
    assert_logits_close(forward(model, ids, np.ones_like(ids)), expected)

    merge_lora(model)
    assert all(layer.lora_a is None for layer in linear_layers(model).values())
    model_lib.save_pretrained(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_logits_close(hf_logits(merged, ids), expected)


def test_bad_targets_and_adapters_are_named(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama-gqa")
    model = model_lib.from_pretrained(folder)
    with pytest.raises(ValueError, match="match no linear layer; this model has: down_proj, gate_proj, .*v_proj"):
        apply_lora(model, LoraConfig(target_modules=["qkv_proj"]))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="LoRA rank r must be >= 1"):
        LoraConfig(r=0)


def test_nf4_round_trip_and_memory(tiny_checkpoint):
    rng = np.random.RandomState(0)
    weight = rng.randn(128, 96).astype(np.float32) * 0.05
    restored = np.asarray(dequantize_nf4(quantize_nf4(weight), jnp.float32))
    # NF4 with absmax blocks of 64: error well under a tenth of the weights' scale.
    assert np.abs(restored - weight).mean() < 0.1 * np.abs(weight).mean()
    assert np.corrcoef(restored.ravel(), weight.ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_nf4(np.ones((3, 5), np.float32))

    folder, _ = tiny_checkpoint("llama-gqa")
    model = model_lib.from_pretrained(folder, dtype="bfloat16")
    before = param_bytes(model)
    quantize_model_nf4(model)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.kernel is None and layer.quantized is not None
    # 4-bit codes plus double-quantized constants: just over a quarter of bf16 per quantized weight.
    assert layer.quantized.nbytes() < 0.3 * 2 * 64 * 96
    assert param_bytes(model) < before


def test_quantizing_while_loading_equals_quantizing_after(tiny_checkpoint, forward):
    """NF4 made tensor by tensor from the checkpoint is the NF4 of the loaded model, and shards under fsdp."""
    from model_lib.quantization import quantize_nf4_host

    folder, _ = tiny_checkpoint("llama-gqa")
    after = model_lib.from_pretrained(folder, dtype="bfloat16")
    quantize_model_nf4(after)
    streamed = model_lib.from_pretrained(folder, dtype="bfloat16", quantization="nf4")
    # float32 here so that the sharded comparison is not bf16 rounding of reordered sums.
    sharded = model_lib.from_pretrained(folder, dtype="float32", quantization="nf4", mesh="fsdp_tp")
    for path, layer in linear_layers(after).items():
        other = linear_layers(streamed)[path]
        if layer.quantized is None:
            assert path == "lm_head" and other.quantized is None
            continue
        assert other.kernel is None
        for name in ("packed", "absmax_q", "absmax_scale", "offset"):
            np.testing.assert_array_equal(getattr(other.quantized, name)[...], getattr(layer.quantized, name)[...])
    # Rows layout (out % 64 == 0) keeps the kernel's axes: an o_proj [heads * 16, embed] shards embed over fsdp.
    o_proj = sharded.model.layers[0].self_attn.o_proj.quantized
    assert o_proj.packed[...].shape == (64, 32) and "fsdp" in str(o_proj.packed[...].sharding.spec)
    ids, mask, _ = padded_batch(seed=3)
    reference = np.asarray(forward(after, ids, mask))
    np.testing.assert_array_equal(np.asarray(forward(streamed, ids, mask)), reference)
    unsharded32 = np.asarray(forward(model_lib.from_pretrained(folder, dtype="float32", quantization="nf4"), ids, mask))
    assert_logits_close(forward(sharded, ids, mask), unsharded32, rel=1e-5)

    # Chunked host quantization (a few rows at a time, from a transposed view) gives the same bytes.
    weight = np.random.RandomState(1).randn(192, 256).astype(np.float32).T  # [in 256, out 192] view
    whole, chunked = quantize_nf4_host(weight, chunk_values=1 << 30), quantize_nf4_host(weight, chunk_values=128)
    for name in ("packed", "absmax_q", "absmax_scale"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))
    assert chunked.offset == whole.offset
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        model_lib.from_pretrained(folder, quantization="int3")

    # "nf4-embeddings" also stores the token embedding and output head in NF4; lookups read single rows.
    everything = model_lib.from_pretrained(folder, dtype="bfloat16")
    quantize_model_nf4(everything, embeddings=True)
    streamed_all = model_lib.from_pretrained(folder, dtype="bfloat16", quantization="nf4-embeddings")
    for model in (everything, streamed_all):
        assert model.lm_head.kernel is None and model.model.embed_tokens.weight is None
    embed = streamed_all.model.embed_tokens
    np.testing.assert_array_equal(embed.quantized.packed[...], everything.model.embed_tokens.quantized.packed[...])
    np.testing.assert_array_equal(embed(jnp.asarray(ids)), jnp.take(dequantize_nf4(embed.quantized, jnp.bfloat16), ids, axis=0))
    np.testing.assert_array_equal(np.asarray(forward(streamed_all, ids, mask)), np.asarray(forward(everything, ids, mask)))
    assert_logits_close(forward(streamed_all, ids, mask), reference, rel=0.2)  # the head's rounding, not a bug


def test_nf4_matmul_in_column_chunks_matches_the_whole_kernel():
    import jax

    from model_lib.quantization import nf4_matmul

    q = quantize_nf4(np.random.RandomState(2).randn(128, 512).astype(np.float32) * 0.05)
    x = jnp.asarray(np.random.RandomState(3).randn(3, 5, 128), jnp.float32)
    whole = jnp.dot(x, dequantize_nf4(q, jnp.float32))
    chunked = nf4_matmul(x, q, budget=128 * 128)  # 4 column chunks
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: nf4_matmul(x, q, budget=128 * 128).sum())(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(lambda x: jnp.dot(x, dequantize_nf4(q, jnp.float32)).sum())(x)), rtol=1e-5, atol=1e-6)
