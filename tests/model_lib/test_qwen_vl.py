"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and GLM-4.1V against transformers: logits with one image and
with images of two sizes, M-RoPE positions, GLM's resampled position table, checkpoint layouts and save/load,
refused settings."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import model_lib
from model_lib.checkpoint import save_pretrained
from model_lib.vision.merge import MergedEmbeddings, placeholder_index
from model_lib.vision.qwen_vl import prompt_positions
from tests.qwen_vl_models import (ARCHITECTURES, GLM4V, IMAGE_TOKEN_ID, QWEN3_ARCHITECTURES, build_qwen_vl, processed,
                                  prompt_with_images)
from tests.tiny_models import assert_logits_close
from tests.vlm_models import random_image, vision_forward


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    built = {}

    def get(architecture: str):
        if architecture not in built:
            folder = tmp_path_factory.mktemp(architecture)
            built[architecture] = (folder, build_qwen_vl(folder, architecture))
        return built[architecture]

    return get


def two_image_prompt(seed: int, architecture: str = ARCHITECTURES[0]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row: text, a 40x48 image (8x8 patches), text, a 24x56 one (4x12), text; its pixels and grids."""
    pixels, grids = processed([random_image(seed), random_image(seed + 1, (24, 56))], architecture)
    rng = np.random.default_rng(seed)
    pieces = [list(rng.integers(3, 100, n)) for n in (5, 4, 6)]
    return np.array([prompt_with_images(pieces, grids)]), pixels, grids


def hf_logits(ref, ids, pixels=None, grids=None) -> np.ndarray:
    extra = {} if pixels is None else dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        ids = torch.tensor(ids)
        return ref(input_ids=ids, mm_token_type_ids=(ids == IMAGE_TOKEN_ID).long(), **extra).logits.numpy()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_with_images_match_transformers(qwen_vl, architecture):
    """One batch: a one-image row (right padded) and a row with two images of different sizes."""
    folder, ref = qwen_vl(architecture)
    model = model_lib.from_pretrained(folder)
    ids, pixels, grids = two_image_prompt(0, architecture)
    assert (ids == IMAGE_TOKEN_ID).sum() == (64 + 48) // 4
    one_pixels, one_grid = processed([random_image(9)], architecture)
    one = np.array([prompt_with_images([[5, 6, 7], [8, 9]], one_grid)])
    batch = np.zeros((2, ids.shape[1]), np.int32)
    batch[0, : one.shape[1]], batch[1] = one[0], ids[0]
    mask = (np.arange(ids.shape[1]) < [[one.shape[1]], [ids.shape[1]]]).astype(np.int32)
    logits = np.asarray(model(batch, mask, pixel_values=np.concatenate([one_pixels, pixels]),
                              image_grid_thw=np.concatenate([one_grid, grids])))
    assert_logits_close(logits[:1, : one.shape[1]], hf_logits(ref, one, one_pixels, one_grid))
    assert_logits_close(logits[1:], hf_logits(ref, ids, pixels, grids))
    # Without images the positions are 1D on all three axes, as transformers' text-only forward.
    text = np.where(ids == IMAGE_TOKEN_ID, 5, ids)
    assert_logits_close(vision_forward(model, text), hf_logits(ref, text))


@pytest.mark.parametrize("architecture", [ARCHITECTURES[0], QWEN3_ARCHITECTURES[0], GLM4V])
def test_mrope_positions_equal_get_rope_index(qwen_vl, architecture):
    """Qwen2-VL's, Qwen3-VL's and GLM-4.1V's `get_rope_index` (written apart in transformers) give one image layout."""
    folder, ref = qwen_vl(architecture)
    ids, _, grids = two_image_prompt(3, architecture)
    ours, delta = prompt_positions(ids[0], model_lib.load_config(folder)[0].multimodal, grids)
    tensor = torch.tensor(ids)
    theirs, deltas = ref.model.get_rope_index(tensor, (tensor == IMAGE_TOKEN_ID).int(), torch.tensor(grids))
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
    assert delta == int(deltas[0, 0]) < 0  # images take fewer positions than tokens


def test_checkpoint_layouts_load_and_save_for_transformers(qwen_vl, tmp_path):
    """The hub layout (`model.layers.`, `visual.`, what transformers saves) and transformers 5's in-memory
    names (`model.language_model.`, `model.visual.`) load; our save loads back in transformers."""
    architecture = ARCHITECTURES[1]
    folder, ref = qwen_vl(architecture)
    assert any(k.startswith("visual.merger.mlp.0") for k in load_file(str(folder / "model.safetensors")))
    memory = {name: t.numpy() for name, t in ref.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in memory)
    other = tmp_path / "memory"
    other.mkdir()
    (other / "config.json").write_text((folder / "config.json").read_text())
    save_file(memory, str(other / "model.safetensors"))
    model = model_lib.from_pretrained(other)
    ids, pixels, grids = two_image_prompt(1)
    expected = hf_logits(ref, ids, pixels, grids)
    assert_logits_close(np.asarray(np.asarray(model(ids, pixel_values=pixels, image_grid_thw=grids))), expected)

    saved = tmp_path / "saved"
    save_pretrained(model, saved)
    assert json.loads((saved / "config.json").read_text())["architectures"] == [architecture]
    import transformers

    reloaded = getattr(transformers, architecture).from_pretrained(saved).eval()
    assert_logits_close(expected, hf_logits(reloaded, ids, pixels, grids))


def test_moe_expert_layouts_load_and_save_for_transformers(qwen_vl, tmp_path):
    """Qwen3-VL-MoE experts: transformers 5's `[out, in]` files and the hub's `[in, out]` ones load; our save
    (`[out, in]`) loads back in transformers."""
    import transformers

    folder, ref = qwen_vl(QWEN3_ARCHITECTURES[1])
    tensors = load_file(str(folder / "model.safetensors"))
    experts = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    gate_up = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert len(experts) == 6 and gate_up.shape == (4, 96, 64)  # [X, 2I, E] as transformers 5 saves it
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: np.ascontiguousarray(np.swapaxes(v, -1, -2)) if k in experts else v for k, v in tensors.items()},
              str(hub / "model.safetensors"))
    # The parameters compare (the logits test runs the forward from transformers 5's layout).
    ours, from_hub = (jax.tree.leaves(nnx.state(model_lib.from_pretrained(f))) for f in (folder, hub))
    for a, b in zip(ours, from_hub, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = tmp_path / "saved"
    save_pretrained(model_lib.from_pretrained(hub), saved)
    reloaded = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(saved).state_dict()
    for name, tensor in ref.state_dict().items():
        np.testing.assert_array_equal(reloaded[name].numpy(), tensor.numpy(), err_msg=name)


@pytest.mark.slow  # two compilations of tower and decoder; CI serves unrolled on the CPU
def test_scanned_serving_view_keeps_deepstack_layers_unrolled(qwen_vl):
    """The serving view scans decoder layers 2 and 3 only (DeepStack adds to the outputs of 0 and 1), and gives
    the unrolled model's logits with images."""
    from model_lib.decoder import DecoderLayer
    from model_lib.layer_scan import LayerScan, scanned_view

    model = model_lib.from_pretrained(qwen_vl(QWEN3_ARCHITECTURES[0])[0])
    view = scanned_view(model)
    assert [type(layer) for layer in view.model.layers] == [DecoderLayer, DecoderLayer, LayerScan]
    ids, pixels, grids = two_image_prompt(2)
    grids = [tuple(int(x) for x in g) for g in grids]
    rope = prompt_positions(ids[0], model.config.multimodal, grids)[0][:, None]
    sizes = np.cumsum([0] + [int(np.prod(g)) for g in grids])

    @nnx.jit
    def logits(m, pixels):  # tower and decoder as one program
        features = jnp.concatenate([m.image_features(pixels[a:b], g) for a, b, g in zip(sizes, sizes[1:], grids)])
        merged = MergedEmbeddings.from_sets(features, placeholder_index(jnp.asarray(ids), IMAGE_TOKEN_ID), 64)
        assert merged.deepstack.shape == (2, (64 + 48) // 4, 64)
        return m(ids, merged=merged, rope_positions=rope)

    np.testing.assert_allclose(np.asarray(logits(view, pixels)), np.asarray(logits(model, pixels)), atol=1e-5)


def test_more_deepstack_sets_than_decoder_layers_are_refused(qwen_vl, tmp_path):
    folder, _ = qwen_vl(QWEN3_ARCHITECTURES[0])
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="2 DeepStack feature sets for 1 decoder layers"):
        model_lib.load_config(tmp_path)


def test_glm4v_saves_for_transformers(qwen_vl, tmp_path):
    """Our save of GLM-4.1V (Glm4 norm names, fused gate_up_proj, the vision tower's convs) loads back in
    transformers with the same logits."""
    import transformers

    folder, ref = qwen_vl(GLM4V)
    save_pretrained(model_lib.from_pretrained(folder), tmp_path)
    reloaded = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pixels, grids = two_image_prompt(2, GLM4V)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, pixels, grids), hf_logits(ref, ids, pixels, grids))


@pytest.mark.parametrize("grid, table", [((4, 12), 4), ((3, 10), 6), ((6, 2), 5)])
def test_position_table_resampling_equals_grid_sample(grid, table):
    """GLM-4.1V's bicubic resampling of its position table (up and down, border taps) equals transformers'
    `F.grid_sample` call."""
    import torch.nn.functional as F

    from model_lib.vision.glm4v_vit import resample_positions

    h, w = grid
    weights = np.random.default_rng(0).normal(size=(table * table, 8)).astype(np.float32)
    rows, cols = (a.reshape(-1) for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    ours = jax.jit(resample_positions)(weights, rows, cols, h, w)
    x, y = (torch.tensor(cols) + 0.5) / w * 2 - 1, (torch.tensor(rows) + 0.5) / h * 2 - 1
    image = torch.tensor(weights).view(table, table, -1).permute(2, 0, 1)[None]
    theirs = F.grid_sample(image, torch.stack([x, y], -1).float()[None, :, None], mode="bicubic", align_corners=False,
                           padding_mode="border")[0, :, :, 0].T
    # Within float32 rounding of the sample coordinate (a wrong cubic coefficient or alignment is off by ~1e-2).
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)


@pytest.mark.parametrize("architecture, change, message", [
    (ARCHITECTURES[1], {"image_token_id": 500}, "outside the vocabulary"),
    (ARCHITECTURES[1], {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 2]}}},
     "mrope_section"),
    (ARCHITECTURES[1], {"text_config": {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                            "mrope_section": [2, 3, 3]}}}, "rope_type 'linear'"),
    (ARCHITECTURES[1], {"vision_config": {"window_size": 10}}, "window_size"),
    # GLM-4.1V: the sections split the rotated half of the head (a whole-head rotary needs other sections).
    (GLM4V, {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}},
     "mrope_section"),
    (GLM4V, {"vision_config": {"image_size": 18}}, "image_size 18"),
])
def test_bad_settings_are_refused(qwen_vl, tmp_path, architecture, change, message):
    folder, _ = qwen_vl(architecture)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        model_lib.load_config(tmp_path)


@pytest.mark.parametrize("config_class, interleaved", [("Qwen2VLTextConfig", False), ("Qwen3VLTextConfig", True)])
def test_mrope_cos_sin_equal_transformers(config_class, interleaved):
    """Sectioned (Qwen2-VL) and interleaved (Qwen3-VL) M-RoPE: cos and sin of `[3, B, T]` positions."""
    import transformers
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from model_lib.config import RopeConfig
    from model_lib.layers.rotary import rotary_cos_sin

    section = [6, 5, 5]
    hf = getattr(transformers, config_class)(hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 5000.0, "mrope_section": section})
    rotary = (Qwen3VLTextRotaryEmbedding if interleaved else Qwen2VLRotaryEmbedding)(hf)
    positions = np.random.default_rng(0).integers(0, 50, (3, 2, 7))
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    rope = RopeConfig(kind="default", theta=5000.0, rotary_dim=32, mrope_section=tuple(section),
                      mrope_interleaved=interleaved)
    ours = rotary_cos_sin(rope, jnp.asarray(positions), jnp.full((2, 7), 7), jnp.float32)
    for mine, theirs in zip(ours, (cos, sin)):
        np.testing.assert_allclose(np.concatenate([mine, mine], -1), theirs.numpy(), atol=1e-6)


def test_training_images_expand_to_patch_rows_and_grid(qwen_vl, tmp_path):
    """Fine-tuning data: a 24x56 image takes its 2x6 merged grid's 12 placeholders (no loss on them) and keeps
    transformers' 48 patch rows with their tower layout."""
    from training.images import IGNORE, TrainingImages

    folder, _ = qwen_vl(ARCHITECTURES[0])
    images = TrainingImages(folder, model_lib.load_config(folder)[0], tmp_path)
    ids, labels, (image,) = images.expand([1, IMAGE_TOKEN_ID, 5], [1, 1, 5], [random_image(0, (24, 56))])
    assert ids == [1] + [IMAGE_TOKEN_ID] * 12 + [5] and labels == [1] + [IGNORE] * 12 + [5]
    np.testing.assert_array_equal(image.pixel_values, processed([random_image(0, (24, 56))])[0])
    assert image.merged_grid == (1, 2, 6) and len(image.vision_layout.order) == 48
