"""Weight-only int8 and int4 (`quantization="int8"` / `"int4"`): against transformers holding the
weights dequantized by each format's published meaning.

The reference rounds each HF linear weight `[out, in]` in numpy and loads the result into the
transformers model: int8 keeps one absmax / 127 scale per output channel (values rounded to
nearest, clipped to +-127); int4 keeps per group of 128 input columns a scale `(max - min) / 15`
and an integer zero point `round(-min / scale)` (values `clip(round(w / scale) + zero, 0, 15)`,
AWQ's asymmetric scheme). Our model keeps the quantized values and applies the scales in the
matmul. int4 runs on a wider tiny Llama (hidden 256, intermediate 384) so that groups of 128
fit several times.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import model_lib
from model_lib.lora import linear_layers, param_bytes
from model_lib.quantization import Int4Weight, Int8Weight
from serving import LLM, SamplingParams
from tests.serving.helpers import hf_greedy, prompts
from tests.tiny_models import DIMS, TinyCase, assert_logits_close, build_checkpoint, hf_logits, padded_batch

pytestmark = pytest.mark.xdist_group("weight_only")

WIDE = TinyCase("llama-wide", "LlamaConfig", dict(num_key_value_heads=2), dims=dict(DIMS, hidden_size=256,
                                                                                   intermediate_size=384))


def int8_rounded(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    return np.clip(np.round(w / np.where(scale == 0, 1, scale)), -127, 127) * scale


def int4_rounded(w: np.ndarray, group: int = 128) -> np.ndarray:
    g = w.reshape(w.shape[0], -1, group)
    low, high = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    scale = np.where(high == low, 1.0, (high - low) / 15.0)
    zero = np.clip(np.round(-low / scale), 0, 15)
    return ((np.clip(np.round(g / scale) + zero, 0, 15) - zero) * scale).reshape(w.shape)


# quantization -> (tiny case, HF-weight rounding, our storage type, float bytes the format saves at least)
FORMATS = {"int8": ("llama-gqa", int8_rounded, Int8Weight, 0.7), "int4": (WIDE, int4_rounded, Int4Weight, 0.83)}


def _reference(hf_model, rounded):
    """A copy of the transformers model with every linear weight but lm_head rounded by the layout."""
    import torch

    ref = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = rounded(module.weight.numpy().astype(np.float32))
                module.weight.copy_(torch.from_numpy(w.astype(np.float32)))
    return ref


@pytest.fixture(scope="module", params=sorted(FORMATS))
def models(request, tiny_checkpoint, tmp_path_factory):
    case, rounded, storage, saved = FORMATS[request.param]
    if isinstance(case, TinyCase):
        folder = tmp_path_factory.mktemp(case.name)
        hf_model = build_checkpoint(case, folder)
    else:
        folder, hf_model = tiny_checkpoint(case)
    return request.param, folder, _reference(hf_model, rounded), storage, saved


def test_logits_match_the_layout_reference(models, forward):
    method, folder, reference, storage, saved = models
    model = model_lib.from_pretrained(folder, quantization=method)
    layers = linear_layers(model)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].quantized, storage)
    assert layers["model.layers.0.self_attn.q_proj"].kernel is None
    assert layers["lm_head"].quantized is None and layers["lm_head"].kernel is not None
    ids, mask, spans = padded_batch(seed=5)
    ours = np.asarray(forward(model, ids, mask))
    for row, (start, end) in enumerate(spans):
        expected = hf_logits(reference, ids[row : row + 1, start:end])[0]
        assert_logits_close(ours[row, start:end], expected)
    float_bytes = param_bytes(model_lib.from_pretrained(folder))
    linear_float = sum(l.in_features * l.out_features * 4 for p, l in layers.items() if p != "lm_head")
    assert float_bytes - param_bytes(model) > saved * linear_float  # values + scales (+ zero points)


def test_int8_greedy_serving_matches_the_layout_reference(tiny_checkpoint):
    """int8 here; an int4 model serves through the same `LLM` path in test_prequantized.py (act-order GPTQ)."""
    folder, hf_model = tiny_checkpoint("llama-gqa")
    reference = _reference(hf_model, int8_rounded)
    llm = LLM(folder, quantization="int8", max_model_len=64, page_size=8)
    batch = prompts()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt)[: len(output.outputs[0].token_ids)]
        assert len(output.outputs[0].token_ids) == 8


def test_unknown_quantization_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*int4"):
        model_lib.from_pretrained(tiny_checkpoint("llama-gqa")[0], quantization="int3")
    with pytest.raises(ValueError, match="has no quantization_config"):
        model_lib.from_pretrained(tiny_checkpoint("llama-gqa")[0], quantization="awq")
