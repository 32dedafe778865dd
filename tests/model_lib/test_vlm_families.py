"""Vision-language architectures beyond LLaVA against transformers: logits with images of different
sizes, one image per prompt and two in one prompt (tiny random checkpoints, random images; transformers
takes its processor's pixels, ours come from serving's per-image preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model_lib
from model_lib.checkpoint import save_pretrained
from tests.tiny_models import assert_logits_close
from tests.vlm_families import VLM_CASES, hf_inputs, our_images
from tests.vlm_models import random_image, vision_forward

# Sizes that pick different tile grids, unpad rows in one and columns in the other.
IMAGES = [random_image(1, (40, 70)), random_image(2, (64, 30))]


@pytest.mark.parametrize("name", [name for name, case in VLM_CASES.items() if not case.cross_attention])
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
        ours = vision_forward(model, inputs["input_ids"].numpy(), pixel_values=pixels, image_sizes=sizes)
        assert_logits_close(np.asarray(ours), expected)
    # Our save loads in transformers (transformers 5 names, LLaVA-NeXT's bare image_newline included).
    save_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        again = type(ref).from_pretrained(tmp_path / "saved").eval()(**inputs).logits.numpy()
    assert_logits_close(again, expected)


def test_video_logits_match_transformers(tmp_path):
    """LLaVA-OneVision with a video (three frames, each as the image processor's base view) and an image."""
    from transformers import AutoTokenizer

    from serving.multimodal.images import load_image_processor
    from serving.multimodal.inputs import ImageInputs, Video
    from tests.vlm_families import VIDEO_TOKEN

    ref = VLM_CASES["llava_onevision"].build(tmp_path)
    model = model_lib.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    processor = load_image_processor(tmp_path)
    video = Video([random_image(seed, (30, 40)) for seed in (3, 4, 5)])
    text = tokenizer.encode(f"a {VIDEO_TOKEN} b <image> c", add_special_tokens=False)
    ids, items = ImageInputs(model.config.multimodal, processor, 1, 1)(text, [video, IMAGES[0]])
    frames = video.pixels(processor)
    pixels, sizes = our_images(tmp_path, IMAGES[:1])
    inputs = hf_inputs(VLM_CASES["llava_onevision"], tmp_path, "<image>", IMAGES[:1])
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], pixel_values_videos=torch.tensor(frames[None])).logits.numpy()
    ours = vision_forward(model, np.asarray([ids]), pixel_values=pixels, image_sizes=sizes, pixel_values_videos=[frames])
    assert_logits_close(np.asarray(ours), expected)
    assert [item.video for item in items] == [True, False]


def test_gemma3_settings_serving_cannot_reproduce_are_refused():
    """Pan-and-scan crops (each its own image run in the prompt) and a pooled grid that does not tile the tower's."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from model_lib.vision.config import VisionConfig
    from model_lib.vision.gemma3 import Gemma3VisionConfig
    from serving.multimodal.inputs import ImageInputs

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                          kind="siglip")
    mm = Gemma3VisionConfig(vision=vision, image_token_id=128, feature_layers=(-1,), feature_strategy="full",
                            mm_tokens_per_image=4)
    ImageInputs(mm, Gemma3ImageProcessorPil(), 1)
    with pytest.raises(ValueError, match="pan-and-scan"):
        ImageInputs(mm, Gemma3ImageProcessorPil(do_pan_and_scan=True), 1)
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        Gemma3VisionConfig(vision=vision, image_token_id=128, feature_layers=(-1,), feature_strategy="full",
                           mm_tokens_per_image=9)
