"""Vision-language architectures beyond LLaVA against transformers: logits with images of different
sizes, one image per prompt and two in one prompt (tiny random checkpoints, random images; transformers
takes its processor's pixels, ours come from serving's per-image preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model_lib
from tests.tiny_models import assert_logits_close
from tests.vlm_families import VLM_CASES, hf_inputs, our_images
from tests.vlm_models import random_image

# Sizes that pick different tile grids, unpad rows in one and columns in the other.
IMAGES = [random_image(1, (40, 70)), random_image(2, (64, 30))]


@pytest.mark.parametrize("name", list(VLM_CASES))
def test_logits_with_images_match_transformers(name, tmp_path):
    case = VLM_CASES[name]
    ref = case.build(tmp_path)
    model = model_lib.from_pretrained(tmp_path)
    marker = case.image_marker
    for text, images in ((f"a {marker} b c d", IMAGES[:1]), (f"a {marker} b c {marker} d", IMAGES)):
        inputs = hf_inputs(case, tmp_path, text, images)
        with torch.no_grad():
            expected = ref(**inputs).logits.numpy()
        pixels, sizes = our_images(tmp_path, images)
        ours = model(inputs["input_ids"].numpy(), pixel_values=pixels, image_sizes=sizes)
        assert_logits_close(np.asarray(ours), expected)
