"""Image+text fine-tuning against transformers, one row per served vision-language family.

A chat record with an image part goes through the trainer's own data path (`Trainer`: its
`TrainingImages`, batches and jitted full fine-tuning step, float32); the step's mean loss and
gradient norm must match transformers' for the same checkpoint, tokens, pixels and labels (-100
where ours has no loss). The families whose batches the trainer cannot build yet must be refused
by name (`training/images.py`), never trained with a wrong mask or wrong positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests.vlm_families import PIXTRAL_TOKENS, VLM_CASES
from tests.vlm_models import build_llava, png_bytes
from training.config import TrainConfig
from training.data import IGNORE, DataConfig, load_examples
from training.images import TRAINS_IMAGES, TrainingImages

BUILDERS = {"llava": build_llava, **{name: case.build for name, case in VLM_CASES.items()}}
TRAINED = ("llava", "gemma3", "internvl", "llama4", "llava_next", "llava_onevision", "mistral3")  # the rest: refused
ANYRES = ("llava_next", "llava_onevision")
# Any-res rows' images by their tile count: a 1x2 grid unpadded to fewer feature rows, a 2x2 grid to fewer columns.
ANYRES_SIZES = {3: (16, 64), 5: (64, 40)}
# Mistral 3's images keep their size: 2x4 and 3x2 feature grids (rows closed by [IMG_BREAK]), padded to 48x64 pixels.
OWN_SIZES = ((32, 64), (48, 32))
SIZES = {**{family: tuple(ANYRES_SIZES.values()) for family in ANYRES}, "mistral3": OWN_SIZES}  # others: the default
# Llama 4's row (tiles with separators, like InternVL's) is the slowest: out of CI's time.
# OneVision's row (LLaVA-NeXT's path with a shrunk map, also checked by the fast layout test below) as well.
TRAINED_ROWS = [pytest.param(f, marks=pytest.mark.slow) if f in ("llama4", "llava_onevision") else f for f in TRAINED]
RTOL = 1e-5


def _data(root, sizes=((32, 64), (32, 32))) -> str:
    """Two chats, each with an image of its own size (InternVL: 3 tiles and 1) and an assistant reply."""
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (size, answer) in enumerate(zip(sizes, ("a red square", "blue"))):
        (data / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
        user = {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "what?"}]}
        records.append({"messages": [user, {"role": "assistant", "content": answer}]})
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
            built[family] = (root / "model", model, _data(root, SIZES.get(family, ((32, 64), (32, 32)))), root)
        return built[family]

    return get


def _hf_loss_and_grad_norm(model, batch, image_token_id: int, gemma: bool, anyres: bool = False) -> tuple[float, float]:
    """transformers' mean loss over our batch's targets and its gradient norm over all parameters (row by row, each
    row's summed loss accumulated)."""
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
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        pixels = pixels[np.abs(pixels).reshape(len(pixels), -1).sum(-1) > 0]  # the image's own tiles, not padding
        extra = {"token_type_ids": (ids == image_token_id).long()} if gemma else {}
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
    assert (batch.image_index >= 0).sum(-1).all() and batch.num_targets() > 0
    if family == "internvl":  # one image of 3 tiles, one of 1 padded to 3
        assert batch.pixel_values.shape[:3] == (2, 1, 3)
    if family in ANYRES:  # grids of 1x2 and 2x2 tiles (and the base view): 3 padded to 5, rows of either length
        assert batch.pixel_values.shape[:3] == (2, 1, 5)
        assert len(set((batch.image_weights.sum(-1) != 0).sum(-1).ravel())) == 2
    mm = trainer.model.config.multimodal
    if family == "mistral3":  # both padded to 48x64: 8 and 6 feature rows, 2 and 3 grid rows closed by break / end
        assert batch.pixel_values.shape[1:] == (1, 3, 48, 64)
        assert sorted(map(tuple, batch.image_sizes[:, 0].tolist())) == [(32, 64), (48, 32)]
        assert sorted((batch.image_index >= 0).sum(-1)) == [6, 8]
        breaks = np.isin(batch.input_ids, trainer.tokenizer.convert_tokens_to_ids(PIXTRAL_TOKENS[1:]))
        assert breaks.sum() == 5 and (batch.image_index[breaks] == -1).all()
    hf_loss, hf_norm = _hf_loss_and_grad_norm(hf, batch, mm.image_token_id, family == "gemma3", family in ANYRES)
    print(f"{family}: loss {loss:.8f} vs {hf_loss:.8f} (rel {abs(loss - hf_loss) / hf_loss:.2e}), "
          f"grad norm {grad_norm:.6f} vs {hf_norm:.6f} (rel {abs(grad_norm - hf_norm) / hf_norm:.2e})")
    np.testing.assert_allclose(loss, hf_loss, rtol=RTOL)
    np.testing.assert_allclose(grad_norm, hf_norm, rtol=1e-4)


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


@pytest.mark.parametrize("family", [f for f in BUILDERS if f not in TRAINED])
def test_untrained_families_are_refused_by_name(family, checkpoint):
    from transformers import AutoTokenizer

    import model_lib

    folder, _, data, _ = checkpoint(family)
    config = model_lib.load_config(folder)[0]
    images = TrainingImages(folder, config, Path(data).parent)
    with pytest.raises(ValueError, match=f"fine-tuning {config.architecture} on image data is not supported yet"):
        load_examples(data, AutoTokenizer.from_pretrained(folder), DataConfig(max_seq_length=64), images)
