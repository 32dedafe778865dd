"""Weight-only int8 (`quantization="int8"`): against transformers holding the int8 weights dequantized by the layout.

The reference dequantizes each HF linear weight `[out, in]` by the published meaning of the
format (one absmax / 127 scale per output channel, values rounded to nearest and clipped to
+-127) in numpy and loads it into the transformers model; our model keeps int8 values and
scales and applies the scale after the matmul.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import model_lib
from model_lib.lora import linear_layers, param_bytes
from serving import LLM, SamplingParams
from tests.serving.helpers import hf_greedy, prompts
from tests.tiny_models import assert_logits_close, hf_logits, padded_batch

pytestmark = pytest.mark.xdist_group("int8")

CASE = "llama-gqa"  # HF module names are ours: the reference is a rename-free copy


def _int8_reference(hf_model):
    """A copy of the transformers model with every linear weight but lm_head int8-rounded by the layout."""
    import torch

    ref = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.numpy().astype(np.float32)  # [out, in]
                scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
                q = np.clip(np.round(w / np.where(scale == 0, 1, scale)), -127, 127)
                module.weight.copy_(torch.from_numpy((q * scale).astype(np.float32)))
    return ref


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    folder, hf_model = tiny_checkpoint(CASE)
    return folder, hf_model, _int8_reference(hf_model)


def test_int8_logits_match_the_layout_reference(models, forward):
    folder, hf_model, reference = models
    model = model_lib.from_pretrained(folder, quantization="int8")
    layers = linear_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].quantized.values[...].dtype == np.int8
    assert layers["lm_head"].quantized is None and layers["lm_head"].kernel is not None
    ids, mask, spans = padded_batch(seed=5)
    ours = np.asarray(forward(model, ids, mask))
    for row, (start, end) in enumerate(spans):
        expected = hf_logits(reference, ids[row : row + 1, start:end])[0]
        assert_logits_close(ours[row, start:end], expected)
    float_bytes = param_bytes(model_lib.from_pretrained(folder))
    linear_float = sum(l.in_features * l.out_features * 4 for p, l in layers.items() if p != "lm_head")
    assert float_bytes - param_bytes(model) > 0.7 * linear_float  # int8 values + float32 scales per column


def test_int8_greedy_serving_matches_the_layout_reference(models):
    folder, _, reference = models
    llm = LLM(folder, quantization="int8", max_model_len=64, page_size=8)
    batch = prompts()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt)[: len(output.outputs[0].token_ids)]
        assert len(output.outputs[0].token_ids) == 8


def test_unknown_quantization_is_refused(models):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        model_lib.from_pretrained(models[0], quantization="int3")
