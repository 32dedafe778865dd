"""Training data for encoder-decoders: the input feeds the encoder, the output is the decoder's target.

`input` / `output` records: the source is the tokenized input (with the tokenizer's special tokens, as
transformers' seq2seq examples tokenize it), the labels the tokenized output (`text_target`, EOS appended
when `add_eos` and the tokenizer did not), every label carrying loss. Pretokenized records give the source
as `input_ids` and the target as `labels` (-100 = no loss). The decoder reads the labels shifted right
behind `decoder_start_token_id` (transformers' `shift_tokens_right`). A batch holds the sources
`[rows, L]` (segment 1 on real tokens), the decoder inputs and the targets `[rows, L]` aligned with them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from training.data import IGNORE, Batch, DataConfig, DataError, Example


def seq2seq_example(record: dict[str, Any], tokenizer: Any, config: DataConfig, where: str) -> Example:
    """One record -> `Example(source ids, labels, decoder_ids=shifted labels)`."""
    if "input_ids" in record:
        if "labels" not in record:
            raise DataError(f"{where}: a pretokenized seq2seq record needs input_ids (the source) and labels")
        source = [int(t) for t in record["input_ids"]]
        labels = [int(t) for t in record["labels"]]
    elif "input" in record and "output" in record:
        if tokenizer is None:
            raise DataError(f"{where}: text data needs a tokenizer (only pretokenized input_ids work without one)")
        source = tokenizer.encode(str(record["input"]))
        labels = tokenizer.encode(str(record["output"]))
        eos = tokenizer.eos_token_id
        if config.add_eos and eos is not None and (not labels or labels[-1] != eos):
            labels.append(eos)
    else:
        raise DataError(f"{where}: record has fields {sorted(record)}; an encoder-decoder trains on input/output "
                        "pairs or pretokenized input_ids with labels")
    if not source or not labels:
        raise DataError(f"{where}: empty source or target")
    start = config.decoder_start_token_id
    decoder = [start] + [t if t != IGNORE else 0 for t in labels[:-1]]
    return Example(source, labels, decoder_ids=decoder)


def truncate(example: Example, max_seq_length: int) -> Example:
    """Source and target each cut to `max_seq_length`."""
    example.input_ids = example.input_ids[:max_seq_length]
    example.labels = example.labels[:max_seq_length]
    example.decoder_ids = example.decoder_ids[:max_seq_length]
    return example


def seq2seq_batch(rows: Sequence[Sequence[Example]], max_seq_length: int, num_rows: int | None = None) -> Batch:
    """Rows of one example each -> sources, decoder inputs and targets `[rows, max_seq_length]`."""
    shape = (num_rows or len(rows), max_seq_length)
    input_ids = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    decoder_ids = np.zeros(shape, np.int32)
    targets = np.full(shape, IGNORE, np.int32)
    for r, row in enumerate(rows):
        if len(row) != 1:
            raise DataError("packing is not supported for encoder-decoders (one example per row)")
        example = row[0]
        n, m = len(example.input_ids), len(example.labels)
        input_ids[r, :n], segment_ids[r, :n] = example.input_ids, 1
        decoder_ids[r, :m], targets[r, :m] = example.decoder_ids, example.labels
    return Batch(input_ids, segment_ids, targets, decoder_input_ids=decoder_ids)
