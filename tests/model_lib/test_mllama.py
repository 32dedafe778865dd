"""Mllama (Llama 3.2 Vision) against transformers on a tiny random checkpoint: float32 logits with one image,
with two images of different tile grids in one prompt (text before the first image: transformers' masked
rows), text only, and our save loaded back by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import model_lib
from model_lib.checkpoint import save_pretrained
from tests.tiny_models import assert_logits_close
from tests.vlm_families import MLLAMA_IMAGE_TOKEN, build_mllama
from tests.vlm_models import random_image

IMAGES = [random_image(1, (40, 70)), random_image(2, (30, 20))]  # 2x4 -> 1x4 tiles, 1x1 -> 2x2 tiles


@nnx.jit
def _forward(model, input_ids, images):
    return model(input_ids, **images)


def test_logits_match_transformers(tmp_path):
    from transformers import MllamaProcessor

    ref = build_mllama(tmp_path)
    processor = MllamaProcessor.from_pretrained(tmp_path)
    model = model_lib.from_pretrained(tmp_path)
    image = MLLAMA_IMAGE_TOKEN
    cases = ((f"{image}a b c", IMAGES[:1]), (f"a {image} b c {image} d", IMAGES), ("a b c", None))
    results = []
    for text, images in cases:
        inputs = processor(text=text, images=images, return_tensors="pt")
        with torch.no_grad():
            expected = ref(**inputs).logits.numpy()
        pixels = {k: v.numpy() for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        ours = np.asarray(_forward(model, inputs["input_ids"].numpy(), pixels))
        assert_logits_close(ours, expected)
        results.append((inputs, expected))
    two_images, _ = results[1]
    assert sorted(two_images["aspect_ratio_ids"][0].tolist()) != [1, 1]  # the images pick tile grids
    assert not two_images["cross_attention_mask"][0, 0].any()  # a row before the first image
    # The images change every row from the first image on.
    inputs, expected = results[0]
    text_only = np.asarray(_forward(model, inputs["input_ids"].numpy(), {}))
    assert np.abs(text_only - expected).max(axis=-1).min() > 1e-3
    # Our save loads in transformers (transformers 5 names).
    save_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        again = type(ref).from_pretrained(tmp_path / "saved").eval()(**inputs).logits.numpy()
    assert_logits_close(again, expected)


def test_serving_refuses_mllama_by_name(tiny_checkpoint):
    from serving import LLM

    folder, _ = tiny_checkpoint("mllama-text")
    with pytest.raises(ValueError, match="MllamaForConditionalGeneration cannot be served yet"):
        LLM(str(folder))
