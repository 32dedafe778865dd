"""Training data in the fms-hf-tuning formats, tokenized, masked, truncated, packed and batched.

Formats (one JSONL line, JSON array element or Parquet row per example):
- a single text field (`dataset_text_field`, default "text"), with the loss on
  what follows `response_template` (or on all of it without one);
- a record rendered by `data_formatter_template` ("### Input: {{input}} ...")
  into one text, then treated like the single text field;
- `input` / `output` pairs: the input is masked, EOS ends the output;
- chat `messages` rendered by the tokenizer's chat template; only assistant
  turns carry loss;
- pretokenized `input_ids` (and optional `labels`, -100 = masked).

Batches are fixed-shape `[rows, max_seq_length]` arrays: `input_ids`,
`segment_ids` (0 = padding; packing puts several examples in a row, each its own
segment, and attention never crosses segments) and `targets` (the next token,
-100 where nothing is learned: masked labels, padding and segment ends).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import struct

from model_lib.vision.mrope import ImageSpan, mrope_positions
from model_lib.vision.qwen_vit import VisionLayout, pad_layout
from serving.multimodal.chat import split_images
from training.images import ExampleImage, TrainingImages

IGNORE = -100


class DataError(ValueError):
    """A data file or record that cannot be used, named by file and line/row."""


@dataclass
class DataConfig:
    dataset_text_field: str = "text"
    response_template: str | None = None
    data_formatter_template: str | None = None
    max_seq_length: int = 1024
    packing: bool = False
    add_eos: bool = True
    decoder_start_token_id: int | None = None  # set for an encoder-decoder (training/seq2seq_data.py)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE = no loss on predicting this token
    images: list[ExampleImage] = field(default_factory=list)  # vision-language chat data (training/images.py)
    decoder_ids: list[int] | None = None  # an encoder-decoder's decoder input (input_ids is its source)


# -- reading ----------------------------------------------------------------------------------
def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every example of a JSONL, JSON or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield f"{path}:{number}", record
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(records, dict):
            records = records.get("data", records.get("train"))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for number, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {number} is not an object")
            yield f"{path}[{number}]", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {number}", record
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .json or .parquet)")


# -- tokenizing ---------------------------------------------------------------------------------
def _render(template: str, record: dict[str, Any], where: str) -> str:
    def field(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name not in record:
            raise DataError(f"{where}: data_formatter_template needs field {name!r}, the record has {sorted(record)}")
        return str(record[name])

    return re.sub(r"\{\{(.*?)\}\}", field, template)


def _text_example(text: str, tokenizer: Any, config: DataConfig, where: str) -> Example:
    ids = tokenizer.encode(text)
    if config.add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if config.response_template:
        cut = text.find(config.response_template)
        if cut < 0:
            raise DataError(f"{where}: response_template {config.response_template!r} not found in the text")
        prefix = tokenizer.encode(text[: cut + len(config.response_template)])
        labels[: len(prefix)] = [IGNORE] * len(prefix)
    return Example(ids, labels)


def _chat_example(messages: list[dict[str, Any]], tokenizer: Any, where: str,
                  images: TrainingImages | None = None) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat template")
    messages, pictures = split_images(messages, images.fetch if images is not None else _no_images)

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        # With images, the text as the model's processor rewrites it (Gemma 3 expands its image markers there).
        return images.inputs.prompt_text(text) if pictures else text

    full = render(messages, False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # The assistant turn is what the template adds between the prompt so far and this turn.
        start = len(tokenizer.encode(render(messages[:i], True), add_special_tokens=False))
        end = len(tokenizer.encode(render(messages[: i + 1], False), add_special_tokens=False))
        labels[start:end] = ids[start:end]
    if pictures:
        if images is None:
            raise DataError(f"{where}: image parts need a vision-language model")
        return Example(*images.expand(ids, labels, pictures))
    return Example(ids, labels)


def _no_images(source: str) -> bytes:
    raise DataError("image parts need a vision-language model")


def to_example(record: dict[str, Any], tokenizer: Any, config: DataConfig, where: str,
               images: TrainingImages | None = None) -> Example:
    """One record in any supported format -> token ids and labels (and a chat's images)."""
    if config.decoder_start_token_id is not None:
        from training.seq2seq_data import seq2seq_example

        return seq2seq_example(record, tokenizer, config, where)
    try:
        if "input_ids" in record:
            ids = [int(t) for t in record["input_ids"]]
            labels = [int(t) for t in record.get("labels", ids)]
            if len(labels) != len(ids):
                raise DataError(f"{where}: labels has {len(labels)} entries, input_ids {len(ids)}")
            return Example(ids, labels)
        if tokenizer is None:
            raise DataError(f"{where}: text data needs a tokenizer (only pretokenized input_ids work without one)")
        if "messages" in record:
            return _chat_example(record["messages"], tokenizer, where, images)
        if config.data_formatter_template:
            return _text_example(_render(config.data_formatter_template, record, where), tokenizer, config, where)
        if "input" in record and "output" in record:
            prompt = tokenizer.encode(str(record["input"]))
            answer = tokenizer.encode(str(record["output"]), add_special_tokens=False)
            if config.add_eos and tokenizer.eos_token_id is not None:
                answer = answer + [tokenizer.eos_token_id]
            return Example(prompt + answer, [IGNORE] * len(prompt) + answer)
        if config.dataset_text_field in record:
            return _text_example(str(record[config.dataset_text_field]), tokenizer, config, where)
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: {e}") from None
    raise DataError(
        f"{where}: record has fields {sorted(record)}; expected '{config.dataset_text_field}', "
        "input/output, messages or input_ids"
    )


def load_examples(
    path: str | Path, tokenizer: Any, config: DataConfig, images: TrainingImages | None = None
) -> list[Example]:
    examples = []
    for where, record in read_records(path):
        example = to_example(record, tokenizer, config, where, images)
        if example.decoder_ids is not None:
            from training.seq2seq_data import truncate

            examples.append(truncate(example, config.max_seq_length))
            continue
        example.input_ids = example.input_ids[: config.max_seq_length]
        example.labels = example.labels[: config.max_seq_length]
        if len(example.input_ids) >= 2:
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fixed random `fraction` of the examples for evaluation."""
    order = np.random.default_rng(seed).permutation(len(examples))
    held = int(round(len(examples) * fraction))
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


# -- batching -----------------------------------------------------------------------------------
@struct.dataclass
class Batch:
    input_ids: np.ndarray  # [rows, L] int32
    segment_ids: np.ndarray  # [rows, L] int32
    targets: np.ndarray  # [rows, L] int32
    # Vision-language data: each row's images in `slots` (zeros where a row has fewer), and per token
    # the feature row it takes among the batch's `rows * slots * F` image rows (-1: its own embedding).
    pixel_values: np.ndarray | None = None  # [rows, slots, C, H, W] float32 (tiles: [rows, slots, N, C, H, W])
    image_index: np.ndarray | None = None  # [rows, L] int32
    # Any-res tiles: each slot's `ExampleImage.layout` (its F rows from the encoded tiles), padded to the run's most.
    image_sources: np.ndarray | None = None  # [rows, slots, F, TAPS] int32
    image_weights: np.ndarray | None = None  # [rows, slots, F, TAPS] float32
    # Images read by cross attention (Mllama; no image_index): `pixel_values` holds each slot's every tile [T], these
    # its aspect ratio id (0: no image) and tile mask as transformers' processor pads them, and per token the slots'
    # tiles it sees (transformers' `cross_attention_mask`; none before a row's first image).
    aspect_ratio_ids: np.ndarray | None = None  # [rows, slots] int32
    aspect_ratio_mask: np.ndarray | None = None  # [rows, slots, T] int32
    cross_attention_mask: np.ndarray | None = None  # [rows, L, slots, T] int32
    # Grid-sized images (Qwen-VL): pixel_values are patch rows [rows, slots, N, C*Tp*P*P] padded to the run's most
    # patches, each slot's tower layout padded alike (`qwen_vit.pad_layout`; arrays [rows, slots, ...]), and each
    # row's M-RoPE positions as transformers' `get_rope_index` gives them.
    vision_layout: VisionLayout | None = None
    rope_positions: np.ndarray | None = None  # [rows, 3, L] int32
    # Images of their own size (Pixtral): each slot's (height, width) within its padded pixels.
    image_sizes: np.ndarray | None = None  # [rows, slots, 2] int32
    # Encoder-decoders: input_ids holds the sources, this the decoder inputs (targets align with it).
    decoder_input_ids: np.ndarray | None = None  # [rows, L] int32

    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack_rows(examples: Sequence[Example], max_seq_length: int, packing: bool) -> list[list[Example]]:
    """Group examples into rows: one per row, or greedily packed (first fit, in order)."""
    if not packing:
        return [[e] for e in examples]
    rows: list[list[Example]] = []
    used: list[int] = []
    for example in examples:
        for i, length in enumerate(used):
            if length + len(example.input_ids) <= max_seq_length:
                rows[i].append(example)
                used[i] += len(example.input_ids)
                break
        else:
            rows.append([example])
            used.append(len(example.input_ids))
    return rows


def make_batch(
    rows: Sequence[Sequence[Example]], max_seq_length: int, num_rows: int | None = None, image_slots: int = 0,
    image_extent: ImageExtent | None = None,
) -> Batch:
    """Rows of examples -> arrays; `num_rows` pads with empty rows so every batch has one shape.

    `image_slots` > 0: the batch carries images, that many per row (rows of one example each); images pad to
    `image_extent` (`run_image_extent`: one shape for every batch of a run), or without it to the batch's largest.
    Encoder-decoder examples make `training.seq2seq_data.seq2seq_batch`es."""
    if any(row and row[0].decoder_ids is not None for row in rows):
        from training.seq2seq_data import seq2seq_batch

        return seq2seq_batch(rows, max_seq_length, num_rows)
    shape = (num_rows or len(rows), max_seq_length)
    input_ids = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    targets = np.full(shape, IGNORE, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for segment, example in enumerate(row, 1):
            n = len(example.input_ids)
            input_ids[r, at : at + n] = example.input_ids
            segment_ids[r, at : at + n] = segment
            # Token t learns to predict label t+1 of its own example; the last token of an example predicts nothing.
            targets[r, at : at + n - 1] = example.labels[1:]
            at += n
    if not image_slots:
        return Batch(input_ids, segment_ids, targets)
    return Batch(input_ids, segment_ids, targets, **_batch_images(rows, shape, image_slots, image_extent))


def _batch_images(rows: Sequence[Sequence[Example]], shape: tuple[int, int], slots: int,
                  extent: ImageExtent | None = None) -> dict[str, np.ndarray]:
    """The image fields of a batch (see `Batch`), padded to `extent` and to the batch's own images; a batch
    without images (text-only chats of an image run) gets all-padding fields of the run's shapes."""
    batch_images = [image for row in rows for example in row for image in example.images]
    if not batch_images and extent is None:
        raise DataError("a batch with image slots needs images or the run's image extent to pad to")
    images = batch_images + ([] if extent is None else [extent.first])  # padding counts the run's first image too
    first = images[0]
    if first.aspect_ratio_id is not None:
        return _batch_cross_images(rows, shape, slots, first.pixel_values.shape)
    pixel_shape, per_slot = first.pixel_values.shape, first.feature_rows
    grids = first.vision_layout is not None
    if grids:  # patch rows [N, D]: every slot padded to the most patches (at least the run's), and merge units
        ratio = len(first.pixel_values) // len(first.vision_layout.restore)  # patches per merge unit
        most = max(_most(extent, "leading"), *(len(image.pixel_values) for image in images))
        pixel_shape, per_slot = (most, pixel_shape[1]), most // ratio
    elif first.own_grid is not None:
        pixel_shape, per_slot, columns = _padded_grid(images, None if extent is None else extent.size)
    elif len(pixel_shape) == 4:
        # Tiles [N, C, H, W] (InternVL, any-res): every slot padded to the most tiles (at least the run's); rows
        # scale with the tiles.
        if any(image.pixel_values.shape[1:] != pixel_shape[1:] for image in images):
            raise DataError(f"images of different shapes {sorted({i.pixel_values.shape for i in images})} "
                            "in one run (only tiles of one size pad to a common count)")
        tiles = max(_most(extent, "leading"), *(image.pixel_values.shape[0] for image in images))
        per_slot = first.feature_rows // pixel_shape[0] * tiles
        pixel_shape = (tiles, *pixel_shape[1:])
    elif any(image.pixel_values.shape != pixel_shape for image in images):
        raise DataError(f"images of different shapes {sorted({i.pixel_values.shape for i in images})} in one run")
    if first.layout is not None:  # any-res: a slot's rows are its layout's, however many tiles
        per_slot = max(_most(extent, "rows"), *(len(image.layout[0]) for image in images))
    pixels = np.zeros((shape[0], slots, *pixel_shape), np.float32)
    index = np.full(shape, -1, np.int32)
    for r, row in enumerate(rows):
        for s, image in enumerate(row[0].images if row else ()):
            pixels[(r, s, *(slice(0, n) for n in image.pixel_values.shape))] = image.pixel_values
            rows_of = np.arange(image.length) if image.rows is None else image.rows
            if image.own_grid is not None:  # row k of the image's grid -> its place in the batch's padded grid
                cols = image.own_grid[1]
                rows_of = np.where(rows_of >= 0, rows_of // cols * columns + rows_of % cols, -1)
            run = np.where(rows_of >= 0, (r * slots + s) * per_slot + rows_of, -1)
            end = min(image.offset + image.length, shape[1])  # truncation may cut a run
            index[r, image.offset : end] = run[: end - image.offset]
    taps = None if first.layout is None else first.layout[0].shape[1]
    layouts = {} if taps is None else _batch_layouts(rows, (shape[0], slots, per_slot, taps))
    if first.own_grid is not None:
        layouts["image_sizes"] = _batch_sizes(rows, (shape[0], slots), pixel_shape[-2:])
    if grids:
        layouts = _batch_grids(rows, shape, slots, pixel_shape[0], per_slot, first)
    return {"pixel_values": pixels, "image_index": index, **layouts}


def _padded_grid(images: Sequence[ExampleImage], size: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
    """Images of their own size: the batch's pixel shape (`size`, or the largest height and width), the rows of its
    feature grid per slot, and that grid's columns."""
    if any(image.pixel_values.ndim != 3 or image.own_grid is None for image in images):
        raise DataError(f"images of their own size must be [C, H, W] each, got "
                        f"{sorted({i.pixel_values.shape for i in images})}")
    largest = _largest(images)
    height, width = size or largest
    if largest[0] > height or largest[1] > width:
        raise DataError(f"an image of {largest[0]}x{largest[1]} pixels does not fit the batches' {height}x{width}")
    unit = images[0].pixel_values.shape[2] // images[0].own_grid[1]  # pixels per feature row along each side
    return (images[0].pixel_values.shape[0], height, width), (height // unit) * (width // unit), width // unit


def _batch_sizes(rows: Sequence[Sequence[Example]], shape: tuple[int, int], full: tuple[int, int]) -> np.ndarray:
    """Each slot's own (height, width) in `shape` [rows, slots]; an empty slot's zeros are encoded `full`."""
    sizes = np.tile(np.asarray(full, np.int32), (*shape, 1))
    for r, row in enumerate(rows):
        for s, image in enumerate(row[0].images if row else ()):
            sizes[r, s] = image.pixel_values.shape[-2:]
    return sizes


def _batch_cross_images(rows: Sequence[Sequence[Example]], shape: tuple[int, int], slots: int,
                        tiles_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Mllama's images: every slot's tiles, aspect ratio id and tile mask (an empty slot as transformers pads a
    batch: id 0, its first tile on) and each token's `cross_attention_mask`, from transformers' own functions. An
    image whose `<|image|>` token truncation cut is left out, as the text no longer names it. `tiles_shape`: an
    image's [T, C, H, W]."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    pixels = np.zeros((shape[0], slots, *tiles_shape), np.float32)
    ratio_ids = np.zeros((shape[0], slots), np.int32)
    ratio_mask = np.zeros((shape[0], slots, tiles_shape[0]), np.int32)
    ratio_mask[..., 0] = 1
    cross = np.zeros((*shape, slots, tiles_shape[0]), np.int32)
    for r, row in enumerate(rows):
        kept = [image for image in (row[0].images if row else ()) if image.offset < shape[1]]
        if not kept:
            continue
        ids = row[0].input_ids[: shape[1]]
        for s, image in enumerate(kept):
            pixels[r, s], ratio_ids[r, s] = image.pixel_values, image.aspect_ratio_id
            ratio_mask[r, s, : image.tiles] = 1
        token_mask = get_cross_attention_token_mask(ids, ids[kept[0].offset])  # the offset holds `<|image|>`
        cross[r, :, : len(kept)] = convert_sparse_cross_attention_mask_to_dense(
            [token_mask], [[image.tiles for image in kept]], tiles_shape[0], shape[1])[0]
    return {"pixel_values": pixels, "aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": ratio_mask,
            "cross_attention_mask": cross}


def _batch_grids(rows: Sequence[Sequence[Example]], shape: tuple[int, int], slots: int, patches: int,
                 units: int, first: ExampleImage) -> dict[str, Any]:
    """Grid-sized images' tower layouts padded to `patches` rows (empty slots: all padding, shaped as `first`'s),
    stacked `[rows, slots, ...]`, and each row's M-RoPE positions `[rows, 3, L]` (padding tokens: any, they are
    masked)."""
    empty = jax.tree.map(lambda x: x[:0], first.vision_layout)
    layouts = [[empty] * slots for _ in range(shape[0])]
    positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), (shape[0], 3, shape[1])).copy()
    for r, row in enumerate(rows):
        example = row[0] if row else None
        if example is None or not example.images:
            continue
        for s, image in enumerate(example.images):
            layouts[r][s] = image.vision_layout
        # Over the whole example (truncation may have cut an image's run), then cut like its tokens.
        spans = [ImageSpan(image.offset, image.merged_grid) for image in example.images]
        n = min(len(example.input_ids), shape[1])
        length = max(len(example.input_ids), *(span.offset + span.length for span in spans))
        positions[r, :, :n] = mrope_positions(length, spans).prompt[:, :n]
    padded = [pad_layout(layout, patches, units) for row in layouts for layout in row]
    stacked = jax.tree.map(lambda *xs: np.stack(xs).reshape(shape[0], slots, *xs[0].shape), *padded)
    return {"vision_layout": stacked, "rope_positions": positions}


def _batch_layouts(rows: Sequence[Sequence[Example]], shape: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    """Each slot's any-res layout in `shape` [rows, slots, F, TAPS], padded (zero weights: rows no token takes)."""
    sources, weights = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        for s, image in enumerate(row[0].images if row else ()):
            sources[r, s, : len(image.layout[0])], weights[r, s, : len(image.layout[1])] = image.layout
    return {"image_sources": sources, "image_weights": weights}


@dataclass(frozen=True)
class ImageExtent:
    """What every batch of a run pads its images to, so that its accumulated micro-batches stack and the step
    compiles once (`run_image_extent`)."""

    first: ExampleImage  # the run's first image: its family's layout for batches of text-only chats
    leading: int = 0  # the most tiles (InternVL, any-res) or patch rows (Qwen-VL) of an image
    rows: int = 0  # any-res: the most feature rows of an image's layout
    size: tuple[int, int] | None = None  # images of their own size (Pixtral): the largest height and width


def run_image_extent(examples: Sequence[Example]) -> ImageExtent | None:
    """The run's `ImageExtent` over `examples` (None for text data)."""
    images = [image for e in examples for image in e.images]
    if not images:
        return None
    leading = max(len(image.pixel_values) for image in images) if images[0].pixel_values.ndim != 3 else 0
    rows = max((len(image.layout[0]) for image in images if image.layout is not None), default=0)
    return ImageExtent(images[0], leading, rows, _largest(images))


def _most(extent: ImageExtent | None, field_name: str) -> int:
    return 0 if extent is None else getattr(extent, field_name)


def _largest(images: Sequence[ExampleImage]) -> tuple[int, int] | None:
    sizes = [image.pixel_values.shape[-2:] for image in images if image.own_grid is not None]
    return (max(h for h, _ in sizes), max(w for _, w in sizes)) if sizes else None


def image_slots(examples: Sequence[Example], packing: bool) -> int:
    """Images per batch row: the most any example has (0 for text data)."""
    slots = max((len(e.images) for e in examples), default=0)
    if slots and packing:
        raise DataError("packing is not supported with images (each row holds one example and its images)")
    return slots


def epoch_batches(
    examples: Sequence[Example], *, rows_per_batch: int, max_seq_length: int, packing: bool, seed: int, epoch: int,
    images_per_row: int = 0, image_extent: ImageExtent | None = None,
) -> list[Batch]:
    """One epoch in a deterministic shuffled order (same seed and epoch -> same batches)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    rows = pack_rows([examples[i] for i in order], max_seq_length, packing)
    return [
        make_batch(rows[i : i + rows_per_batch], max_seq_length, rows_per_batch, images_per_row, image_extent)
        for i in range(0, len(rows), rows_per_batch)
    ]
