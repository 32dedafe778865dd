"""Image+text fine-tuning against transformers, one row per served vision-language family.

A chat record with an image part goes through the trainer's own data path (`Trainer`: its
`TrainingImages`, batches and jitted full fine-tuning step, float32); the step's mean loss and
gradient norm must match transformers' for the same checkpoint, tokens, pixels and labels (-100
where ours has no loss). The families whose batches the trainer cannot build yet must be refused
by name (`training/images.py`), never trained with a wrong mask or wrong positions.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.qwen_vl_models import build_qwen_vl, processed
from tests.vlm_families import PIXTRAL_TOKENS, VLM_CASES
from tests.vlm_models import build_llava, png_bytes
from training.config import TrainConfig
from training.data import IGNORE, DataConfig, load_examples
from training.images import TRAINS_IMAGES, TrainingImages

# Qwen-VL rows by their architecture (tests/qwen_vl_models.py).
GRIDS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
         "glm4v": "Glm4vForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
         "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
BUILDERS = {"llava": build_llava, **{name: case.build for name, case in VLM_CASES.items()},
            **{name: partial(build_qwen_vl, architecture=arch) for name, arch in GRIDS.items()}}
TRAINED = ("llava", "gemma3", "internvl", "llama4", "llava_next", "llava_onevision", "mllama", "mistral3", *GRIDS)
ANYRES = ("llava_next", "llava_onevision")
# Any-res rows' images by their tile count: a 1x2 grid unpadded to fewer feature rows, a 2x2 grid to fewer columns.
ANYRES_SIZES = {3: (16, 64), 5: (64, 40)}
# Mllama's rows: two images (grids 1x2 and 3x1, padding tiles in both) with text between, and one (2x2) in a row
# whose second image slot is batch padding.
MLLAMA_IMAGES = (((20, 40), (64, 30)), ((32, 32),))
# Qwen-VL rows' images: a 4x12-patch grid (2x6 placeholder tokens, non-square) and an 8x8 one padded from 48 to 64 rows.
GRID_SIZES = ((24, 56), (40, 48))
# Mistral 3's images keep their size: 2x4 and 3x2 feature grids (rows closed by [IMG_BREAK]), padded to 48x64 pixels.
OWN_SIZES = ((32, 64), (48, 32))
# Each row's images (one chat per row); the other families: one image of 32x64 and one of 32x32.
IMAGES = {**{family: tuple((size,) for size in ANYRES_SIZES.values()) for family in ANYRES}, "mllama": MLLAMA_IMAGES,
          **{family: tuple((size,) for size in GRID_SIZES) for family in GRIDS},
          "mistral3": tuple((size,) for size in OWN_SIZES)}
# Llama 4's row (tiles with separators, like InternVL's) is the slowest: out of CI's time.
# OneVision's row (LLaVA-NeXT's path with a shrunk map, also checked by the fast layout test below) as well.
# Qwen3-VL-MoE's row (Qwen3-VL's path with a MoE decoder) too.
TRAINED_ROWS = [pytest.param(f, marks=pytest.mark.slow) if f in ("llama4", "llava_onevision", "qwen3_vl_moe") else f
                for f in TRAINED]
RTOL = 1e-5


def _data(root, images=(((32, 64),), ((32, 32),))) -> str:
    """Two chats, each with images of their own sizes (InternVL: 3 tiles and 1), "what?" after each, and an
    assistant reply."""
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (sizes, answer) in enumerate(zip(images, ("a red square", "blue"))):
        content = []
        for j, size in enumerate(sizes):
            (data / f"{i}_{j}.png").write_bytes(png_bytes(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
            content += [{"type": "image", "image": f"{i}_{j}.png"}, {"type": "text", "text": "what?"}]
        records.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return str(data / "train.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (folder, transformers model, data file), built once per family."""
    built = {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            model = BUILDERS[family](root / "model")
            built[family] = (root / "model", model, _data(root, IMAGES.get(family, (((32, 64),), ((32, 32),)))), root)
        return built[family]

    return get


def _hf_loss_and_grad_norm(model, batch, image_token_id: int, gemma: bool, anyres: bool = False,
                           grid_images: dict | None = None) -> tuple[float, float]:
    """transformers' mean loss over our batch's targets and its gradient norm over all parameters (row by row, each
    row's summed loss accumulated). `grid_images` (Qwen-VL): placeholder count -> (patch rows, grid) of the image
    whose run is that long, as transformers' image processor makes them; transformers computes the positions."""
    import torch

    # torch's `padding_idx` zeroes the pad row's embedding gradient; the tiny tokenizer writes "\n" (Gemma 3's
    # image run is wrapped in them) as that id, which real tokenizers never do, and our embeddings train every row.
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    model.zero_grad()
    total, count = 0.0, batch.num_targets()
    for r in range(batch.input_ids.shape[0]):
        n = int((batch.segment_ids[r] != 0).sum())
        ids = torch.tensor(np.asarray(batch.input_ids[r, :n])[None], dtype=torch.long)
        # Our targets are shifted (token t predicts label t+1); transformers shifts its labels itself.
        labels = np.concatenate([[IGNORE], np.asarray(batch.targets[r, : n - 1])])
        pixels = np.asarray(batch.pixel_values[r])  # [slots, C, H, W], or tiles [slots, N, C, H, W]
        if batch.cross_attention_mask is not None:
            extra, pixels = _mllama_inputs(batch, r, ids[0].tolist(), image_token_id)
        else:
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
            pixels = pixels[np.abs(pixels).reshape(len(pixels), -1).sum(-1) > 0]  # the image's own tiles, not padding
            extra = {"token_type_ids": (ids == image_token_id).long()} if gemma else {}
        if grid_images is not None:
            pixels, grid = grid_images[int((ids == image_token_id).sum())]
            extra = {"image_grid_thw": torch.tensor(grid), "mm_token_type_ids": (ids == image_token_id).long()}
        if anyres:  # one image's tiles and its original size
            extra, pixels = {"image_sizes": torch.tensor([ANYRES_SIZES[len(pixels)]])}, pixels[None]
        if batch.image_sizes is not None:  # padded images of their own size: transformers cuts each to its size
            extra = {"image_sizes": torch.tensor(np.asarray(batch.image_sizes[r])[: len(pixels)])}
        loss = model(input_ids=ids, pixel_values=torch.tensor(pixels), labels=torch.tensor(labels[None]), **extra).loss
        row_sum = loss * int((labels != IGNORE).sum()) / count
        row_sum.backward()
        total += float(row_sum.detach())
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return total, float(norm)


def _mllama_inputs(batch, r: int, ids: list[int], image_token_id: int) -> tuple[dict, np.ndarray]:
    """transformers' Mllama inputs for row `r` alone: its own images (aspect ratio id > 0: all its tiles, padding
    tiles too) and the processor's cross-attention mask for its ids."""
    import torch
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    own = np.asarray(batch.aspect_ratio_ids[r]) > 0
    ratio_mask = np.asarray(batch.aspect_ratio_mask[r])[own]
    mask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, image_token_id)],
                                                        [ratio_mask.sum(-1).tolist()], ratio_mask.shape[-1], len(ids))
    extra = {"aspect_ratio_ids": torch.tensor(np.asarray(batch.aspect_ratio_ids[r])[own][None], dtype=torch.long),
             "aspect_ratio_mask": torch.tensor(ratio_mask[None], dtype=torch.long),
             "cross_attention_mask": torch.tensor(mask)}
    return extra, np.asarray(batch.pixel_values[r])[own][None]


def _grid_images(root, family: str) -> dict | None:
    """A Qwen-VL row's images by placeholder count: (patch rows, grid) from transformers' image processor."""
    if family not in GRIDS:
        return None
    from PIL import Image

    images = {}
    for i in range(len(GRID_SIZES)):
        pixels, grid = processed([np.asarray(Image.open(root / "data" / f"{i}_0.png"))], GRIDS[family])
        images[int(np.prod(grid)) // 4] = pixels, grid
    return images


def _trainer(folder, data: str, root, max_seq_length: int = 64, **options):
    from training.trainer import Trainer

    settings = dict(model_name_or_path=str(folder), training_data_path=data, output_dir=str(root / "out"),
                    max_seq_length=max_seq_length, peft_method="none", per_device_train_batch_size=2, max_steps=1,
                    learning_rate=1e-4, torch_dtype="float32", progress_bar=False, seed=0)
    return Trainer(TrainConfig(**{**settings, **options}))


def _step(trainer):
    """The trainer's jitted step on its first batch: (mean loss, gradient norm)."""
    batch = trainer.micro_batch(0)
    out = trainer.train_step(trainer.trainable, trainer.opt_state, trainer.rng_state, trainer.frozen,
                             trainer._device_batch([batch]), jnp.asarray(0))
    return batch, float(out[3]), float(out[4])


@pytest.mark.parametrize("family", TRAINED_ROWS)
def test_image_chat_loss_and_gradients_match_transformers(family, checkpoint):
    folder, hf, data, root = checkpoint(family)
    trainer = _trainer(folder, data, root, 128 if family in ANYRES else 64)  # LLaVA-NeXT's 2x2 grid: 72 rows
    assert trainer.model.config.architecture in TRAINS_IMAGES
    batch, loss, grad_norm = _step(trainer)
    if family == "mllama":
        _check_mllama_batch(batch, folder, data, trainer.model.config.multimodal.image_token_id)
    else:
        assert (batch.image_index >= 0).sum(-1).all()
    assert batch.num_targets() > 0
    if family == "internvl":  # one image of 3 tiles, one of 1 padded to 3
        assert batch.pixel_values.shape[:3] == (2, 1, 3)
    if family in ANYRES:  # grids of 1x2 and 2x2 tiles (and the base view): 3 padded to 5, rows of either length
        assert batch.pixel_values.shape[:3] == (2, 1, 5)
        assert len(set((batch.image_weights.sum(-1) != 0).sum(-1).ravel())) == 2
    if family in GRIDS:  # patch rows of 48 and 64 (padded) per slot; the 4x12 grid's positions are not square
        assert batch.pixel_values.shape[:3] == (2, 1, 64) and batch.rope_positions.shape == (2, 3, 64)
    mm = trainer.model.config.multimodal
    if family == "mistral3":  # both padded to 48x64: 8 and 6 feature rows, 2 and 3 grid rows closed by break / end
        assert batch.pixel_values.shape[1:] == (1, 3, 48, 64)
        assert sorted(map(tuple, batch.image_sizes[:, 0].tolist())) == [(32, 64), (48, 32)]
        assert sorted((batch.image_index >= 0).sum(-1)) == [6, 8]
        breaks = np.isin(batch.input_ids, trainer.tokenizer.convert_tokens_to_ids(PIXTRAL_TOKENS[1:]))
        assert breaks.sum() == 5 and (batch.image_index[breaks] == -1).all()
    hf_loss, hf_norm = _hf_loss_and_grad_norm(hf, batch, mm.image_token_id, family == "gemma3", family in ANYRES,
                                              _grid_images(root, family))
    print(f"{family}: loss {loss:.8f} vs {hf_loss:.8f} (rel {abs(loss - hf_loss) / hf_loss:.2e}), "
          f"grad norm {grad_norm:.6f} vs {hf_norm:.6f} (rel {abs(grad_norm - hf_norm) / hf_norm:.2e})")
    np.testing.assert_allclose(loss, hf_loss, rtol=RTOL)
    np.testing.assert_allclose(grad_norm, hf_norm, rtol=1e-4)


def _check_mllama_batch(batch, folder, data: str, image_token_id: int) -> None:
    """Each slot holds transformers' processor output for its image (every tile, its aspect ratio id and mask), the
    padding slot is padded as the processor pads a batch, and the tokens before a row's first `<|image|>` see no
    tile."""
    from PIL import Image

    from serving.multimodal.images import load_image_processor

    processor = load_image_processor(folder)
    expected = {}  # image file -> (tiles, aspect ratio id, aspect ratio mask)
    for path in Path(data).parent.glob("*.png"):
        out = processor(images=[Image.open(path).convert("RGB")], return_tensors="np")
        expected[path.stem] = [np.asarray(out[k])[0, 0] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]
    for r in range(batch.input_ids.shape[0]):
        two = batch.aspect_ratio_ids[r, 1] != 0  # the row of the first chat (two images) or of the second
        for s, name in enumerate(("0_0", "0_1") if two else ("1_0",)):
            tiles, ratio, ratio_mask = expected[name]
            assert np.array_equal(batch.pixel_values[r, s], tiles) and batch.aspect_ratio_ids[r, s] == ratio
            assert np.array_equal(batch.aspect_ratio_mask[r, s], ratio_mask)
        if not two:
            assert not batch.pixel_values[r, 1].any() and batch.aspect_ratio_mask[r, 1].tolist() == [1, 0, 0, 0]
        first = int(np.flatnonzero(batch.input_ids[r] == image_token_id)[0])
        assert first > 0 and not batch.cross_attention_mask[r, :first].any() and batch.cross_attention_mask[r, first].any()


def test_mllama_lora_adapter_loads_in_peft(checkpoint, tmp_path):
    """All-linear LoRA on Mllama's image chats adapts the language model's self- and cross-attention and MLPs, not
    the vision side; the adapter it exports, loaded by transformers + PEFT, gives our trained model's logits."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import MllamaForConditionalGeneration

    from tests.tiny_models import assert_logits_close, hf_logits
    from tests.vlm_models import vision_forward
    from training.trainer import Trainer

    folder, _, data, _ = checkpoint("mllama")
    config = TrainConfig(model_name_or_path=str(folder), training_data_path=data, output_dir=str(tmp_path),
                         max_seq_length=64, peft_method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules="all-linear", per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                         torch_dtype="float32", progress_bar=False, seed=0)
    trainer = Trainer(config)
    trainer.train()
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in load_file(tmp_path / "adapter_model.safetensors")}
    # PEFT would read "all-linear" as the vision side's layers too: the adapter names its modules instead.
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == sorted(modules)
    layers = "model.language_model.layers"
    assert {f"{layers}.1.cross_attn.{p}_proj" for p in "qkvo"} | {f"{layers}.{i}.self_attn.q_proj" for i in (0, 2)} <= modules
    assert not any("vision_model" in m or "multi_modal_projector" in m or m.endswith("lm_head") for m in modules)
    batch = trainer.micro_batch(0)
    r = int(np.flatnonzero(batch.aspect_ratio_ids[:, 1])[0])  # the row with two images and text between
    n = int((batch.segment_ids[r] != 0).sum())
    ids = np.asarray(batch.input_ids[r : r + 1, :n])
    images = {k: np.asarray(getattr(batch, k)[r : r + 1]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    ours = vision_forward(trainer.trained_model(), ids, **images,
                          cross_attention_mask=np.asarray(batch.cross_attention_mask[r : r + 1, :n]))
    peft = PeftModel.from_pretrained(MllamaForConditionalGeneration.from_pretrained(folder), tmp_path).eval()
    extra, pixels = _mllama_inputs(batch, r, ids[0].tolist(), trainer.model.config.multimodal.image_token_id)
    expected = hf_logits(peft, ids, pixel_values=torch.tensor(pixels), **extra)
    base = hf_logits(MllamaForConditionalGeneration.from_pretrained(folder).eval(), ids,
                     pixel_values=torch.tensor(pixels), **extra)
    assert np.abs(expected - base).max() > 1e-3  # the adapter changes the logits
    assert_logits_close(ours, expected)


def test_mistral3_accumulates_micro_batches_of_their_own_size(checkpoint):
    """Images of their own size pad to the run's largest: micro-batches of one image each (32x64, 48x32) share one
    shape, and accumulating them matches transformers over both."""
    import jax

    folder, hf, data, root = checkpoint("mistral3")
    trainer = _trainer(folder, data, root, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    micro = [trainer.micro_batch(0), trainer.micro_batch(1)]
    assert [b.pixel_values.shape for b in micro] == [(1, 1, 3, 48, 64)] * 2
    out = trainer.train_step(trainer.trainable, trainer.opt_state, trainer.rng_state, trainer.frozen,
                             trainer._device_batch(micro), jnp.asarray(0))
    both = jax.tree.map(lambda *parts: np.concatenate(parts), *micro)
    hf_loss, hf_norm = _hf_loss_and_grad_norm(hf, both, trainer.model.config.multimodal.image_token_id, False)
    np.testing.assert_allclose(float(out[3]), hf_loss, rtol=RTOL)
    np.testing.assert_allclose(float(out[4]), hf_norm, rtol=1e-4)


def test_gemma3_row_sees_dropped_image_spans(checkpoint, monkeypatch):
    """The Gemma 3 row can fail: with its images causal (no bidirectional spans) the loss leaves transformers'."""
    from model_lib.vision.gemma3 import Gemma3VisionConfig

    folder, hf, data, root = checkpoint("gemma3")
    monkeypatch.setattr(Gemma3VisionConfig, "bidirectional_images", False)
    trainer = _trainer(folder, data, root)
    batch, loss, _ = _step(trainer)
    hf_loss, _ = _hf_loss_and_grad_norm(hf, batch, trainer.model.config.multimodal.image_token_id, True)
    print(f"gemma3 without spans: loss {loss:.8f} vs {hf_loss:.8f} (rel {abs(loss - hf_loss) / hf_loss:.2e})")
    assert abs(loss - hf_loss) > 10 * RTOL * hf_loss, (loss, hf_loss)


@pytest.mark.parametrize("anyres_max", [None, 1])
def test_anyres_layout_gathers_what_pack_computes(checkpoint, anyres_max, monkeypatch):
    """The trainer's host-side layout gives `pack`'s rows for grids, unpadding, a lone base view and OneVision's
    shrinking (anyres_max), its one-hot columns run in several chunks."""
    import dataclasses

    import jax

    import model_lib
    from model_lib.vision import anyres
    from model_lib.vision.anyres import gather_packed, pack, pack_layout

    monkeypatch.setattr(anyres, "_LAYOUT_CHUNK", 7)
    mm = dataclasses.replace(model_lib.load_config(checkpoint("llava_next")[0])[0].multimodal, anyres_max=anyres_max)
    for size in ((16, 64), (64, 40), (40, 64), (64, 64), (7, 50)):
        rows, cols = mm.grid(size)
        for tiles in (1, 1 + rows * cols):
            features = jax.random.normal(jax.random.key(tiles), (tiles, mm.image_tokens, 8))
            newline = jax.random.normal(jax.random.key(0), (8,))
            np.testing.assert_allclose(gather_packed(features, newline, *pack_layout(mm, tiles, size)),
                                       pack(mm, features, newline, size), rtol=1e-6, atol=1e-6)


def test_llava_next_row_sees_dropped_newline_rows(checkpoint, monkeypatch):
    """The any-res rows can fail: with image_newline left out of the layout the loss leaves transformers'."""
    from model_lib.vision import anyres

    folder, hf, data, root = checkpoint("llava_next")
    pack = anyres.pack
    monkeypatch.setattr(anyres, "pack", lambda mm, features, newline, size: pack(mm, features, newline * 0, size))
    trainer = _trainer(folder, data, root, 128)
    batch, loss, _ = _step(trainer)
    hf_loss, _ = _hf_loss_and_grad_norm(hf, batch, trainer.model.config.multimodal.image_token_id, False, True)
    print(f"llava_next without newline rows: loss {loss:.8f} vs {hf_loss:.8f} "
          f"(rel {abs(loss - hf_loss) / hf_loss:.2e})")
    assert abs(loss - hf_loss) > 10 * RTOL * hf_loss, (loss, hf_loss)


def test_every_served_family_trains_on_images_and_a_new_one_is_refused_by_name():
    """Every family the table builds has a parity row; an architecture without a parity-checked batch layout is
    refused by name before any batch is built."""
    from training.images import refuse_untrained_images

    assert set(BUILDERS) == set(TRAINED)
    with pytest.raises(ValueError, match="fine-tuning NewVLForConditionalGeneration on image data is not supported"):
        refuse_untrained_images("NewVLForConditionalGeneration")


def test_qwen_vl_row_sees_one_dimensional_positions(checkpoint, monkeypatch):
    """The Qwen-VL rows can fail: with 1D positions (every image taken as text) the loss leaves transformers'."""
    from model_lib.vision import mrope
    from training import data

    folder, hf, data_file, root = checkpoint("qwen2_vl")
    monkeypatch.setattr(data, "mrope_positions", lambda length, spans: mrope.mrope_positions(length, []))
    trainer = _trainer(folder, data_file, root)
    batch, loss, _ = _step(trainer)
    hf_loss, _ = _hf_loss_and_grad_norm(hf, batch, trainer.model.config.multimodal.image_token_id, False,
                                        grid_images=_grid_images(root, "qwen2_vl"))
    print(f"qwen2_vl with 1D positions: loss {loss:.8f} vs {hf_loss:.8f} (rel {abs(loss - hf_loss) / hf_loss:.2e})")
    assert abs(loss - hf_loss) > 10 * RTOL * hf_loss, (loss, hf_loss)


def test_qwen_vl_lora_adapts_the_tower_only_by_regex(checkpoint):
    """Qwen-VL's tower and merger (`visual.`) stay frozen under named targets and all-linear, as the other towers."""
    import model_lib
    from model_lib.lora import target_groups

    model = model_lib.from_pretrained(checkpoint("qwen2_vl")[0])
    assert not any("visual" in module for module in target_groups(model, "all-linear"))
    assert set(target_groups(model, r".*visual.*qkv")) == {f"model.visual.blocks.{i}.attn.qkv" for i in range(2)}
