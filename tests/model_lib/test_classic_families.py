"""Classic decoders (GPT-2 ... MPT): refused options, ALiBi slopes against transformers'
own builders, and checkpoints saved from the bare base model."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import model_lib
from model_lib.registry import get_family
from tests.tiny_models import BIGCODE_DIMS, BLOOM_DIMS, FALCON_DIMS, MPT_DIMS, OPT_DIMS, SEQ_LEN, assert_logits_close, hf_logits, random_ids

FALCON_12_HEADS = dict(FALCON_DIMS, hidden_size=96, num_attention_heads=12)  # slopes that bf16 rounds


def mapped(config_class: str, dims: dict, **overrides):
    hf = getattr(transformers, config_class)(**dims, **overrides)
    architecture = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf.model_type]
    return get_family(architecture).config_from_hf(hf, architecture)


@pytest.mark.parametrize(
    "config_class, dims, overrides, option",
    [
        ("GPT2Config", BIGCODE_DIMS, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        ("GPTJConfig", BIGCODE_DIMS, dict(tie_word_embeddings=True), "tie_word_embeddings"),
        ("GPTJConfig", BIGCODE_DIMS, dict(rotary_dim=32), "rotary_dim"),  # > head_dim
        ("PhiConfig", {}, dict(tie_word_embeddings=True), "tie_word_embeddings"),
        ("OPTConfig", OPT_DIMS, dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine"),
        ("FalconConfig", FALCON_DIMS, dict(new_decoder_architecture=True, parallel_attn=False), "parallel_attn"),
        ("FalconConfig", FALCON_DIMS, dict(num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn"),
        ("BloomConfig", BLOOM_DIMS, dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
        ("MptConfig", MPT_DIMS, dict(attn_config=dict(qk_ln=True)), "qk_ln"),
        ("MptConfig", MPT_DIMS, dict(attn_config=dict(attn_type="multiquery_attention")), "attn_type"),
        ("MptConfig", MPT_DIMS, dict(no_bias=False), "no_bias"),
    ],
)
def test_unsupported_options_are_named(config_class, dims, overrides, option):
    with pytest.raises(ValueError, match=option):
        mapped(config_class, dims, **overrides)


@pytest.mark.parametrize("heads", [4, 6, 12, 40])
def test_bloom_slopes_match_transformers(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    ours = mapped("BloomConfig", dict(BLOOM_DIMS, hidden_size=8 * heads, n_head=heads)).alibi_slopes
    np.testing.assert_allclose(ours, _get_alibi_slopes(heads, "cpu").numpy(), rtol=1e-6)


@pytest.mark.parametrize("heads, bias_max", [(4, 8), (12, 8), (6, 4)])
def test_mpt_slopes_match_transformers(heads, bias_max):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    config = mapped("MptConfig", dict(MPT_DIMS, d_model=8 * heads, n_heads=heads), attn_config=dict(alibi_bias_max=bias_max))
    bias = build_mpt_alibi_tensor(heads, 4, alibi_bias_max=bias_max).numpy()  # [H, 1, S]: slope * (k - last)
    np.testing.assert_allclose(config.alibi_slopes, bias[:, 0, -1] - bias[:, 0, -2], rtol=1e-6)


def test_falcon_slopes_are_bf16_and_scaled_like_transformers():
    """transformers adds bf16(slope) * k_pos to q.k before the 1/sqrt(d) scale; our kernels add after it."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    config = mapped("FalconConfig", FALCON_12_HEADS, alibi=True)
    bias = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), 12, torch.float32).numpy()  # [H, 1, S]: bias * k_pos
    np.testing.assert_allclose(np.asarray(config.alibi_slopes) * math.sqrt(config.head_dim), bias[:, 0, 1], rtol=1e-7)
    assert bias[:, 0, 1][8] != 2**-0.5  # the rounding matters for these heads


@pytest.mark.parametrize("case", ["gpt2-conv1d", "opt-pre-ln"])
def test_bare_model_checkpoint_loads(case, tiny_checkpoint, tmp_path, forward):
    """GPT-2's (and BLOOM's, OPT's) hub checkpoints omit the base-model prefix; GPT-2's carry mask buffers."""
    folder, hf_model = tiny_checkpoint(case)
    copy = tmp_path / "bare"
    shutil.copytree(folder, copy)
    prefix = {"gpt2-conv1d": "transformer.", "opt-pre-ln": "model."}[case]
    tensors = {name.removeprefix(prefix): t for name, t in load_file(copy / "model.safetensors").items()}
    if case == "gpt2-conv1d":
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert not any(name.startswith(prefix) for name in tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})

    ids = random_ids(2, SEQ_LEN, seed=9)
    assert_logits_close(forward(model_lib.from_pretrained(copy), ids, np.ones_like(ids)), hf_logits(hf_model, ids))
