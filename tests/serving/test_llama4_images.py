"""Llama 4's numpy image preprocessing and placeholder expansion against transformers' `Llama4ImageProcessor`
and `Llama4Processor` (run on torch where torchvision is missing: `tests/llama4_reference.py`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.multimodal.llama4_images import Llama4ImageTiler, resize_uint8
from tests.llama4_reference import torchvision_image_processor
from tests.vlm_models import random_image

# (height, width): one tile, upscaled to a tile, downscaled grids of each shape, extreme aspect ratios.
SIZES = [(20, 20), (9, 30), (40, 70), (64, 30), (50, 36), (200, 17), (13, 250), (120, 121)]
SETTINGS = [dict(size={"height": 28, "width": 28}, max_patches=4),
            dict(size={"height": 28, "width": 28}, max_patches=6, resize_to_max_canvas=True),
            dict(size={"height": 28, "width": 28}, max_patches=16, image_mean=[0.48, 0.46, 0.41],
                 image_std=[0.27, 0.26, 0.28])]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "max-canvas", "clip-mean-16"])
def test_tiles_equal_transformers(settings):
    import torch

    reference = torchvision_image_processor(**settings)
    ours = Llama4ImageTiler(reference.to_dict())
    for seed, size in enumerate(SIZES):
        image = Image.fromarray(random_image(seed, size))
        expected = reference(images=[image], return_tensors="pt")
        got = ours(images=[image])
        assert got["aspect_ratios"][0] == tuple(expected["aspect_ratios"][0].tolist()), size
        assert np.array_equal(got["pixel_values"][0], expected["pixel_values"].to(torch.float32).numpy()), size


def test_real_tile_size_equals_transformers():
    """Llama 4's own 336-pixel tiles, a photo-sized image (uneven downscaling ratios)."""
    import torch

    reference = torchvision_image_processor()
    image = Image.fromarray(random_image(7, (517, 389)))
    expected = reference(images=[image], return_tensors="pt")["pixel_values"].to(torch.float32).numpy()
    assert np.array_equal(Llama4ImageTiler(reference.to_dict())(images=[image])["pixel_values"][0], expected)


def test_resize_equals_torch_uint8_kernel():
    import torch

    rng = np.random.default_rng(0)
    for _ in range(40):
        (h, w), (nh, nw) = rng.integers(1, 90, 2), rng.integers(1, 90, 2)
        image = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        expected = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=[int(nh), int(nw)],
                                                   mode="bilinear", align_corners=False, antialias=True)[0]
        assert np.array_equal(resize_uint8(image, int(nh), int(nw)), expected.numpy())


def test_placeholders_equal_the_processor():
    """The prompt ids of three images (one tile, 2x2, 3x1) as `Llama4Processor` expands them."""
    from transformers import Llama4Processor

    from model_lib.vision.llama4 import Llama4MultiModalConfig, Llama4VisionConfig
    from serving.multimodal.inputs import ImageInputs
    from tests.vlm_families import IMAGE_TOKEN_ID, LLAMA4_PROCESSOR, LLAMA4_TOKENS, _tokenizer

    tokenizer = _tokenizer(LLAMA4_TOKENS, LLAMA4_TOKENS[0])
    reference = torchvision_image_processor(size={"height": 28, "width": 28}, max_patches=4)
    processor = Llama4Processor(image_processor=reference, tokenizer=tokenizer, **LLAMA4_PROCESSOR)
    vision = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_layers=1, num_heads=2, image_size=28,
                                patch_size=7, shuffle=2, projector_input_dim=32, projector_output_dim=32)
    mm = Llama4MultiModalConfig(vision=vision, image_token_id=IMAGE_TOKEN_ID + 1).with_tokenizer(tokenizer)
    images = [random_image(seed, size) for seed, size in enumerate([(20, 20), (40, 70), (64, 30)])]
    text = "a <|image|> b <|image|> c <|image|> d"
    expected = processor(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
    ids, items = ImageInputs(mm, Llama4ImageTiler(reference.to_dict()), 3)(
        tokenizer.encode(text, add_special_tokens=False), images)
    assert ids == expected
    assert [len(item.pixel_values) for item in items] == [1, 5, 4]
