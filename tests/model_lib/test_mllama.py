"""Mllama (Llama 3.2 Vision) against transformers on a tiny random checkpoint: float32 logits with two images
of different tile grids in one prompt (text before the first image: transformers' masked rows) and text
only, and our save loaded back by transformers (serving: tests/serving/test_vlm_families_serving.py)."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

import model_lib
from model_lib.checkpoint import save_pretrained
from tests.tiny_models import assert_logits_close
from tests.vlm_families import MLLAMA_IMAGE_TOKEN, build_mllama
from tests.vlm_models import IMAGE_TOKEN_ID, random_image

IMAGES = [random_image(1, (20, 40)), random_image(2, (64, 30))]  # tile grids 1x2 and 3x1 of at most 4 tiles


@nnx.jit
def _forward(model, input_ids, images):
    return model(input_ids, **images)


def test_logits_match_transformers(tmp_path):
    """Two images of different tile grids in one prompt: rows before the first image see no tile, rows
    between the images see the first, the rest the second. The same ids without pixels: text only."""
    from transformers import MllamaProcessor

    ref = build_mllama(tmp_path)
    processor = MllamaProcessor.from_pretrained(tmp_path)
    model = model_lib.from_pretrained(tmp_path)
    inputs = processor(text=f"a {MLLAMA_IMAGE_TOKEN} b c {MLLAMA_IMAGE_TOKEN} d", images=IMAGES, return_tensors="pt")
    assert inputs["aspect_ratio_mask"][0].sum(-1).tolist() == [2, 3]  # padding tiles in both
    ids = inputs["input_ids"].numpy()
    first, second = np.flatnonzero(ids[0] == IMAGE_TOKEN_ID)
    sees = inputs["cross_attention_mask"][0].numpy().any(-1)  # [L, I]
    assert first > 0 and not sees[:first].any()
    assert (sees[first:second] == [True, False]).all() and (sees[second:] == [False, True]).all()
    pixels = {k: v.numpy() for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = ref(**inputs).logits.numpy()
        text_only = ref(input_ids=inputs["input_ids"]).logits.numpy()
    assert_logits_close(np.asarray(_forward(model, ids, pixels)), expected)
    assert_logits_close(np.asarray(_forward(model, ids, {})), text_only)
    assert np.abs(text_only - expected).max(axis=-1).min() > 1e-3  # the images change every row
    # Our save loads in transformers (transformers 5 names).
    save_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        again = type(ref).from_pretrained(tmp_path / "saved").eval()(**inputs).logits.numpy()
    assert_logits_close(again, expected)

