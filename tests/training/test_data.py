"""Data formats, masking, truncation, packing and the errors that name file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tiny_models import build_tokenizer
from training.data import IGNORE, DataConfig, DataError, epoch_batches, load_examples, make_batch, pack_rows, to_example

TOK = build_tokenizer()


def _labels_text(example) -> str:
    return TOK.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=True)


def test_input_output_masks_the_input():
    example = to_example({"input": "Q: 2+2?", "output": " A: 4"}, TOK, DataConfig(), "x")
    assert TOK.decode(example.input_ids, skip_special_tokens=True) == "Q: 2+2? A: 4"
    assert _labels_text(example) == " A: 4" and example.labels[-1] == TOK.eos_token_id
    assert example.labels[: len(TOK.encode("Q: 2+2?"))] == [IGNORE] * len(TOK.encode("Q: 2+2?"))


def test_text_field_with_response_template_and_formatter():
    config = DataConfig(dataset_text_field="output", response_template="### Answer:")
    example = to_example({"output": "### Question: hi ### Answer: hello"}, TOK, config, "x")
    assert _labels_text(example) == " hello"
    formatted = DataConfig(data_formatter_template="### Question: {{q}} ### Answer: {{a}}", response_template="### Answer:")
    assert _labels_text(to_example({"q": "hi", "a": "yo"}, TOK, formatted, "x")) == " yo"
    with pytest.raises(DataError, match="x: data_formatter_template needs field 'a'"):
        to_example({"q": "hi"}, TOK, formatted, "x")
    with pytest.raises(DataError, match="response_template '### Answer:' not found"):
        to_example({"output": "no template here"}, TOK, config, "x")


def test_chat_messages_learn_only_assistant_turns():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    example = to_example({"messages": messages}, TOK, DataConfig(), "x")
    learned = "".join(TOK.decode([t]) for t in example.labels if t != IGNORE)
    assert learned == " hello\n ciao\n"  # what the template emits for the two assistant turns
    assert "hi" not in learned and "bye" not in learned


def test_pretokenized_and_truncation(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text(json.dumps({"input_ids": list(range(3, 40)), "labels": [IGNORE] * 5 + list(range(8, 40))}) + "\n")
    [example] = load_examples(file, None, DataConfig(max_seq_length=16))
    assert example.input_ids == list(range(3, 19)) and example.labels[:5] == [IGNORE] * 5


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_file_formats(tmp_path, suffix):
    records = [{"input": f"q{i}", "output": f"a{i}"} for i in range(5)]
    file = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif suffix == "json":
        file.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), file)
    examples = load_examples(file, TOK, DataConfig())
    assert [_labels_text(e) for e in examples] == [f"a{i}" for i in range(5)]


def test_malformed_lines_are_named(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": \n')
    with pytest.raises(DataError, match=rf"{file}:2: malformed JSON"):
        load_examples(file, TOK, DataConfig())
    file.write_text('{"input": "a", "output": "b"}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=rf"{file}:2: record has fields \['prompt'\]"):
        load_examples(file, TOK, DataConfig())
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl", TOK, DataConfig())


def test_packing_keeps_every_target_and_separates_segments():
    examples = [to_example({"input": "ab" * i, "output": "cd"}, TOK, DataConfig(), "x") for i in range(1, 7)]
    rows = pack_rows(examples, 16, packing=True)
    assert len(rows) < len(examples)
    packed, unpacked = make_batch(rows, 16), make_batch([[e] for e in examples], 16)
    assert packed.num_targets() == unpacked.num_targets() == sum(sum(t != IGNORE for t in e.labels[1:]) for e in examples)
    # No target crosses a segment boundary: a target exists only where the next token is in the same segment.
    has_target = packed.targets[:, :-1] != IGNORE
    assert (packed.segment_ids[:, 1:][has_target] == packed.segment_ids[:, :-1][has_target]).all()


def test_epoch_order_is_a_function_of_seed_and_epoch():
    examples = [to_example({"input": f"q{i}", "output": "a"}, TOK, DataConfig(), "x") for i in range(10)]
    kwargs = dict(rows_per_batch=4, max_seq_length=8, packing=False, seed=1)
    first = epoch_batches(examples, epoch=0, **kwargs)
    assert all(b.input_ids.shape == (4, 8) for b in first)  # the short last batch is padded
    np.testing.assert_array_equal(first[0].input_ids, epoch_batches(examples, epoch=0, **kwargs)[0].input_ids)
    assert not np.array_equal(first[0].input_ids, epoch_batches(examples, epoch=1, **kwargs)[0].input_ids)


def test_gemma3_image_chat_is_expanded_as_its_processor_does(tmp_path):
    """Gemma 3's processor rewrites `<start_of_image>` in the text (newlines, soft tokens, `<end_of_image>`)
    before tokenizing: a training chat with an image takes exactly the processor's ids, no loss on the image."""
    import base64

    from transformers import AutoTokenizer

    import model_lib
    from serving.multimodal.images import to_rgb
    from tests.vlm_families import VLM_CASES, hf_inputs
    from tests.vlm_models import IMAGE_TOKEN_ID, png_bytes, random_image
    from training.images import TrainingImages

    case = VLM_CASES["gemma3"]
    case.build(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    image = random_image(3, (30, 40))
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    messages = [{"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": "what?"}]},
                {"role": "assistant", "content": "a cat"}]
    images = TrainingImages(tmp_path, model_lib.load_config(tmp_path)[0], tmp_path)
    example = to_example({"messages": messages}, tokenizer, DataConfig(), "x", images)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == hf_inputs(case, tmp_path, text, [to_rgb(image)])["input_ids"][0].tolist()
    assert all(label == IGNORE for t, label in zip(example.input_ids, example.labels) if t == IMAGE_TOKEN_ID)
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]).strip() == "a cat"


def test_mllama_image_chat_batches_as_its_processor_does(tmp_path):
    """Mllama keeps one `<|image|>` per image: a training chat with two images (text between) takes the processor's
    ids, and its batch row the processor's tiles, aspect ratios and `cross_attention_mask`; a cut `<|image|>` leaves
    its slot empty, padded as the processor pads a batch."""
    import base64

    from transformers import AutoTokenizer

    import model_lib
    from serving.multimodal.images import to_rgb
    from tests.vlm_families import VLM_CASES, hf_inputs
    from tests.vlm_models import IMAGE_TOKEN_ID, png_bytes, random_image
    from training.data import Example
    from training.images import TrainingImages

    case = VLM_CASES["mllama"]
    case.build(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    pictures = [random_image(1, (20, 40)), random_image(2, (64, 30))]  # grids 1x2 and 3x1 of up to 4 tiles
    urls = ["data:image/png;base64," + base64.b64encode(png_bytes(image)).decode() for image in pictures]
    content = [{"type": "image", "image": urls[0]}, {"type": "text", "text": "what?"},
               {"type": "image", "image": urls[1]}, {"type": "text", "text": "and?"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "a cat"}]
    images = TrainingImages(tmp_path, model_lib.load_config(tmp_path)[0], tmp_path)
    example = to_example({"messages": messages}, tokenizer, DataConfig(), "x", images)
    expected = hf_inputs(case, tmp_path, tokenizer.apply_chat_template(messages, tokenize=False),
                         [to_rgb(image) for image in pictures])
    n = len(example.input_ids)
    assert example.input_ids == expected["input_ids"][0].tolist() and example.input_ids.count(IMAGE_TOKEN_ID) == 2
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]).strip() == "a cat"
    batch = make_batch([[example]], n + 3, 2, image_slots=2)
    assert batch.image_index is None
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        np.testing.assert_array_equal(getattr(batch, name)[0], expected[name][0].numpy())
    np.testing.assert_array_equal(batch.cross_attention_mask[0, :n], expected["cross_attention_mask"][0].numpy())
    assert not batch.cross_attention_mask[1].any() and not batch.aspect_ratio_ids[1].any()
    cut = example.input_ids.index(IMAGE_TOKEN_ID, example.input_ids.index(IMAGE_TOKEN_ID) + 1)  # the second image
    truncated = Example(example.input_ids[:cut], example.labels[:cut], example.images)  # as load_examples cuts
    short = make_batch([[truncated]], cut, image_slots=2)
    assert short.aspect_ratio_ids[0, 1] == 0 and short.aspect_ratio_mask[0, 1].tolist() == [1, 0, 0, 0]
    assert not short.pixel_values[0, 1].any() and not short.cross_attention_mask[0, :, 1].any()
    np.testing.assert_array_equal(short.cross_attention_mask[0, :, 0], expected["cross_attention_mask"][0, :cut, 0])


def test_images_of_their_own_size_pad_to_the_batch_and_keep_their_grid_places():
    """Pixtral's images keep their size: pixels pad to the batch's largest, each slot keeps its own size, row k of
    an image's grid takes its place in the padded grid, and [IMG_BREAK] / [IMG_END] keep their embeddings."""
    from serving.multimodal.inputs import feature_rows
    from training.data import Example, ImageExtent
    from training.images import ExampleImage

    image, row_break, end = 5, 6, 7

    def example(rows: int, cols: int) -> Example:
        run = ([image] * cols + [row_break]) * rows
        run[-1] = end
        ids = [1, 2, *run, 3]
        pixels = np.ones((3, 16 * rows, 16 * cols), np.float32)
        return Example(ids, ids, [ExampleImage(2, len(run), pixels, feature_rows(run, image), own_grid=(rows, cols))])

    batch = make_batch([[example(2, 4)], [example(3, 2)]], 16, image_slots=1)
    assert batch.pixel_values.shape == (2, 1, 3, 48, 64)
    assert batch.image_sizes.tolist() == [[[32, 64]], [[48, 32]]]
    assert batch.pixel_values[1, 0, :, :48, :32].all() and not batch.pixel_values[1, 0, :, :, 32:].any()
    # Padded grids of 3x4 rows: slot 1's rows start at 12; its 3x2 grid skips the padded columns.
    assert batch.image_index.tolist() == [[-1, -1, 0, 1, 2, 3, -1, 4, 5, 6, 7, -1, -1, -1, -1, -1],
                                          [-1, -1, 12, 13, -1, 16, 17, -1, 20, 21, -1, -1, -1, -1, -1, -1]]
    # Padded further (the run's largest, for one shape per run): grids of 3x5 rows.
    batch = make_batch([[example(2, 4)], [example(3, 2)]], 16, image_slots=1,
                       image_extent=ImageExtent(example(2, 4).images[0], size=(48, 80)))
    assert batch.pixel_values.shape == (2, 1, 3, 48, 80)
    assert batch.image_index.tolist() == [[-1, -1, 0, 1, 2, 3, -1, 5, 6, 7, 8, -1, -1, -1, -1, -1],
                                          [-1, -1, 15, 16, -1, 20, 21, -1, 25, 26, -1, -1, -1, -1, -1, -1]]
    with pytest.raises(DataError, match="an image of 48x64 pixels does not fit the batches' 32x64"):
        make_batch([[example(2, 4)], [example(3, 2)]], 16, image_slots=1,
                   image_extent=ImageExtent(example(2, 4).images[0], size=(32, 64)))


def test_every_batch_of_an_image_run_pads_to_the_run_extent():
    """Tiles pad to the run's most, not each batch's, and a batch of text-only chats carries all-padding image
    fields of the same shapes: micro-batches stack and the step compiles once."""
    from training.data import Example, run_image_extent
    from training.images import ExampleImage

    def example(tiles: int) -> Example:
        ids = [1, 2, *([5] * 4 * tiles), 3]  # 4 feature rows per tile
        return Example(ids, ids, [ExampleImage(2, 4 * tiles, np.ones((tiles, 3, 8, 8), np.float32))])

    text = Example([1, 2, 3], [1, 2, 3], [])
    examples = [example(1), example(3), text]  # the run's first image is not its largest
    extent = run_image_extent(examples)
    batches = [make_batch([[e]], 16, image_slots=1, image_extent=extent) for e in examples]
    assert [b.pixel_values.shape for b in batches] == [(1, 1, 3, 3, 8, 8)] * 3
    assert batches[0].pixel_values[0, 0, 0].all() and not batches[0].pixel_values[0, 0, 1:].any()
    assert batches[0].image_index[0].tolist() == [-1, -1, 0, 1, 2, 3, *[-1] * 10]
    assert not batches[2].pixel_values.any() and (batches[2].image_index == -1).all()
    assert make_batch([[examples[0]]], 16, image_slots=1).pixel_values.shape == (1, 1, 1, 3, 8, 8)  # no extent
    with pytest.raises(DataError, match="needs images or the run's image extent"):
        make_batch([[text]], 16, image_slots=1)
