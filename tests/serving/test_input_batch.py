"""The vectorized step inputs against their definition, written out one sequence at a time."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine.input_batch import InputBatch
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence
from serving.sampling_params import SamplingParams

MAX_SEQS, MAX_PAGES, PAGE = 6, 8, 4


def expected(scheduled: list[ScheduledSequence], shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Each sequence's tokens laid out in turn: known tokens as ids, a device-sampled one fed from its slot."""
    token_pad, seq_pad, page_pad = shape
    out = dict(input_ids=np.zeros(token_pad, np.int32), feed=np.full(token_pad, -1, np.int32),
               positions=np.zeros(token_pad, np.int32), seq_lens=np.zeros(token_pad, np.int32),
               cu_q_lens=np.zeros(seq_pad + 1, np.int32), kv_lens=np.zeros(seq_pad, np.int32),
               page_tables=np.zeros((seq_pad, page_pad), np.int32), logits_indices=np.zeros(seq_pad, np.int32),
               slots=np.full(seq_pad, MAX_SEQS, np.int32))  # padding rows name the scratch slot
    offset = 0
    for i, item in enumerate(scheduled):
        seq, start = item.seq, item.seq.num_computed
        for j in range(item.num_new_tokens):
            position = start + j
            if position < seq.num_known_tokens:
                out["input_ids"][offset + j] = seq.tokens[position]
            else:
                out["feed"][offset + j] = seq.slot
            out["positions"][offset + j] = position
            out["seq_lens"][offset + j] = start + item.num_new_tokens
        offset += item.num_new_tokens
        out["cu_q_lens"][i + 1 :] = offset
        out["kv_lens"][i] = start + item.num_new_tokens
        out["page_tables"][i, : len(seq.pages)] = seq.pages
        out["logits_indices"][i] = offset - 1
        out["slots"][i] = seq.slot
    return out


def built(inputs) -> dict[str, np.ndarray]:
    meta = inputs.batch.meta
    return dict(input_ids=inputs.input_ids, feed=inputs.feed, positions=inputs.batch.positions,
                seq_lens=inputs.batch.seq_lens, cu_q_lens=meta.cu_q_lens, kv_lens=meta.kv_lens,
                page_tables=meta.page_tables, logits_indices=inputs.logits_indices, slots=inputs.batch.slots)


def sequence(seq_id: int, prompt_len: int, outputs: int, pending: int, computed: int, slot: int, pages: list[int]):
    seq = Sequence(seq_id, f"r{seq_id}", 0, list(range(10 * seq_id, 10 * seq_id + prompt_len)), SamplingParams(), 0, 64)
    seq.output_ids = [900 + k for k in range(outputs)]
    seq.num_pending, seq.num_computed, seq.slot, seq.pages = pending, computed, slot, pages
    return seq


@pytest.mark.parametrize("shape", [(16, 6, 4), (32, 6, 8)])
def test_inputs_match_the_per_sequence_layout_across_steps(shape):
    batch = InputBatch(MAX_SEQS, MAX_PAGES)
    prefill = sequence(1, 9, 0, 0, 4, slot=2, pages=[5, 6, 7])  # second chunk of a prompt, no token yet
    decode = sequence(2, 5, 3, 1, 8, slot=0, pages=[1, 3])  # its last token is still on the device
    synced = sequence(3, 3, 2, 0, 4, slot=5, pages=[4, 0])  # its last token was read back
    steps = [[ScheduledSequence(prefill, 5), ScheduledSequence(decode, 1), ScheduledSequence(synced, 1)]]
    for item in steps[0]:  # one step on: each has read a token (decode has the next one pending)
        item.seq.num_computed += item.num_new_tokens
        item.seq.output_ids.append(777)
    decode.pages.append(2)  # grew in place: only the new page is written
    preempted = sequence(2, 5, 4, 0, 0, slot=0, pages=[3])  # same slot, new page list: the row is rewritten
    steps.append([ScheduledSequence(prefill, 1), ScheduledSequence(synced, 1), ScheduledSequence(decode, 1)])
    steps.append([ScheduledSequence(preempted, 9), ScheduledSequence(synced, 1)])
    for scheduled in steps:
        got, want = built(batch.build(scheduled, shape)), expected(scheduled, shape)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
