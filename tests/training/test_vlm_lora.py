"""LoRA on the language model of a tiny LLaVA through `train`, with image+text chat data: it learns
the colour of a square from the image (held-out accuracy from chance to above 90%), the vision
tower and projector untouched."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

import model_lib
from model_lib.lora import target_groups
from serving.multimodal.images import load_image_processor, to_rgb
from tests.vlm_models import IMAGE_TOKEN_ID, IMAGE_TOKENS, build_llava, png_bytes
from training.config import TrainConfig
from training.trainer import Trainer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 230), "white": (240, 240, 240)}
QUESTION = "colour?"


def square(colour: str, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 image: dark noise with a 14-20 pixel square of `colour` somewhere."""
    image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    side = int(rng.integers(14, 21))
    y, x = rng.integers(0, 32 - side, 2)
    image[y : y + side, x : x + side] = COLOURS[colour]
    return image


def chat(image_source: str, answer: str | None = None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image", "image": image_source}, {"type": "text", "text": QUESTION}]}
    return [user] + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def accuracy(model, folder, held_out: list[tuple[np.ndarray, str]]) -> float:
    """How often the first answer character is the argmax after the generation prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = load_image_processor(folder)
    # The template renders "assistant: <answer>": the answer starts after the space that follows the prompt.
    text = tokenizer.apply_chat_template(chat("x"), tokenize=False, add_generation_prompt=True) + " "
    ids = tokenizer.encode(text, add_special_tokens=False)
    at = ids.index(IMAGE_TOKEN_ID)
    ids = ids[:at] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + ids[at + 1:]
    pixels = processor(images=[to_rgb(image) for image, _ in held_out], return_tensors="np")["pixel_values"]
    batch = np.tile(np.asarray(ids)[None], (len(held_out), 1))
    logits = np.asarray(model(batch, pixel_values=pixels))[:, -1]
    wanted = [tokenizer.convert_tokens_to_ids(colour[0]) for _, colour in held_out]
    return float(np.mean(logits.argmax(-1) == np.asarray(wanted)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-lora")
    folder = root / "llava"
    build_llava(folder)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(96):
        colour = list(COLOURS)[i % len(COLOURS)]
        image = square(colour, rng)
        if i % 2:  # half as files next to the data, half inline
            (data / f"{i}.png").write_bytes(png_bytes(image))
            source = f"{i}.png"
        else:
            source = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
        records.append({"messages": chat(source, colour)})
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    held_out = [(square(colour, rng), colour) for _ in range(8) for colour in COLOURS]
    config = TrainConfig(
        model_name_or_path=str(folder), training_data_path=str(data / "train.jsonl"), output_dir=str(root / "out"),
        max_seq_length=48, peft_method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules="all-linear", num_train_epochs=6, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", torch_dtype="float32", progress_bar=False, seed=0,
    )
    trainer = Trainer(config)
    before = accuracy(trainer.trained_model(), folder, held_out)
    result = trainer.train()
    return dict(folder=folder, trainer=trainer, before=before, result=result, held_out=held_out)


def test_lora_learns_the_colour_of_the_square(run):
    after = accuracy(run["trainer"].trained_model(), run["folder"], run["held_out"])
    assert run["before"] < 0.3 and after > 0.9, (run["before"], after)


def test_vision_side_stays_frozen(run):
    model = run["trainer"].trained_model()
    adapted = {path for parts in target_groups(model, "all-linear").values() for path, _ in parts}
    assert adapted and not any(p.startswith(("vision_tower.", "multi_modal_projector.")) for p in adapted)
    base = model_lib.from_pretrained(run["folder"])
    np.testing.assert_array_equal(np.asarray(model.vision_tower.encoder.layers[0].self_attn.q_proj.kernel[...]),
                                  np.asarray(base.vision_tower.encoder.layers[0].self_attn.q_proj.kernel[...]))
    assert model.vision_tower.encoder.layers[0].self_attn.q_proj.lora_a is None
