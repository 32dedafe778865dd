"""LLaVA against transformers: logits with images, the checkpoint layouts, and save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import model_lib
from model_lib.checkpoint import save_pretrained
from tests.tiny_models import assert_logits_close
from tests.vlm_models import IMAGE_TOKEN_ID, IMAGE_TOKENS, build_llava, vision_forward

VARIANTS = {
    "default": {},  # feature layer -2, CLS dropped
    "full-multilayer": dict(vision_feature_select_strategy="full", vision_feature_layer=[-1, 0]),  # CLS kept, 2 layers
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"llava-{name}")
            built[name] = (folder, build_llava(folder, **VARIANTS[name]))
        return built[name]

    return get


def image_batch(seed: int, image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 40 tokens, each with one image run at a different place, and their pixels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, IMAGE_TOKEN_ID, (2, 40))
    ids[0, 4 : 4 + image_tokens] = IMAGE_TOKEN_ID
    ids[1, 20 : 20 + image_tokens] = IMAGE_TOKEN_ID
    return ids, rng.standard_normal((2, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_with_images_match_transformers(llava, variant):
    folder, ref = llava(variant)
    model = model_lib.from_pretrained(folder)
    tokens = model.config.multimodal.image_tokens
    assert tokens == IMAGE_TOKENS + (variant != "default")
    ids, pixels = image_batch(0, tokens)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    assert_logits_close(vision_forward(model, ids, pixel_values=pixels), expected)
    # Without images the same model is the plain decoder.
    text = np.where(ids == IMAGE_TOKEN_ID, 5, ids)
    with torch.no_grad():
        expected_text = ref(input_ids=torch.tensor(text)).logits.numpy()
    assert_logits_close(vision_forward(model, text), expected_text)


def test_every_checkpoint_layout_loads_and_saves_for_transformers(llava, tmp_path):
    """Hub layout (`language_model.model.`, `vision_tower.vision_model.`), transformers 5's in-memory
    names (`model.language_model.`), and our save, which transformers loads back."""
    folder, ref = llava("default")
    tensors = load_file(str(folder / "model.safetensors"))
    hub = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
    memory = {name: t.numpy() for name, t in ref.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in memory)
    ids, pixels = image_batch(1, IMAGE_TOKENS)
    expected = vision_forward(model_lib.from_pretrained(folder), ids, pixel_values=pixels)
    for name, layout in (("hub", hub), ("memory", memory)):
        other = tmp_path / name
        other.mkdir()
        (other / "config.json").write_text((folder / "config.json").read_text())
        save_file(layout, str(other / "model.safetensors"))
        np.testing.assert_array_equal(vision_forward(model_lib.from_pretrained(other), ids, pixel_values=pixels), expected)

    saved = tmp_path / "saved"
    save_pretrained(model_lib.from_pretrained(folder), saved)
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    from transformers import LlavaForConditionalGeneration

    reloaded = LlavaForConditionalGeneration.from_pretrained(saved).eval()
    with torch.no_grad():
        again = reloaded(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    assert_logits_close(expected, again)


def test_bad_vision_settings_are_refused(llava, tmp_path):
    folder, _ = llava("default")
    for change, message in (
        ({"image_token_index": 500}, "outside the vocabulary"),
        ({"vision_feature_layer": 7}, "out of range"),
    ):
        config = json.loads((folder / "config.json").read_text())
        config.update(change)
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            model_lib.load_config(tmp_path)
