"""A step's host arrays, built with a few numpy operations instead of per-sequence slicing.

`InputBatch` keeps every slot's page table between steps (`[M + 1, max pages]`, the last
row all zeros for padding rows) and writes only the pages a sequence gained since the last
step, so a decode step copies no page list. The flat token arrays come from one pass that
gathers each sequence's numbers into lists, then vectorized expansion over the step's
tokens (`np.repeat` by each sequence's token count). A fresh array is handed out for every
step: the device may still read the previous step's arrays (dispatch is asynchronous, and
the CPU backend may use a host array in place).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from model_lib.layers import PagedBatch
from model_lib.vision.merge import MergedEmbeddings
from model_lib.vision.qwen_vl import QwenVLConfig
from pallas_kernels.paged_attention import PagedMetadata
from serving.engine.scheduler import ScheduledSequence
from serving.engine.spans import step_visible_until
from serving.multimodal.mrope import step_rope_positions


@dataclass
class StepInputs:
    """One step's host arrays, padded to bucket shapes."""

    input_ids: np.ndarray  # [T_pad]
    feed: np.ndarray  # [T_pad] slot whose last sampled token is this input (-1: input_ids has it)
    batch: PagedBatch  # numpy fields
    logits_indices: np.ndarray  # [S_pad] flat index of each sequence's last token
    lora_slots: np.ndarray | None = None  # [T_pad] each token's adapter slot (-1: none); with served adapters
    merged: MergedEmbeddings | None = None  # image features in place of placeholder embeddings ([T_pad] index)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(tokens, sequences, pages per sequence): what the step compiles for."""
        return self.input_ids.shape[0], self.logits_indices.shape[0], self.batch.meta.page_tables.shape[1]

    @property
    def variant(self) -> tuple:
        """The shape plus what else makes the step compile separately: image rows, MLA's expanded rows,
        bidirectional spans."""
        extra = ("images",) * (self.merged is not None) + ("expanded MLA rows",) * (self.batch.expanded_from is not None)
        extra += ("spans",) * (self.batch.meta.visible_until is not None)
        return (*self.shape, *extra)


class InputBatch:
    """Builds `StepInputs` for scheduled sequences; holds the slots' page tables between steps."""

    def __init__(self, max_num_seqs: int, max_pages_per_seq: int, *, with_lora: bool = False,
                 mrope: QwenVLConfig | None = None, spans: bool = False):
        """`mrope`: the model's Qwen-VL config when its rotary takes M-RoPE positions `[3, T]`; `spans`: every
        step carries `visible_until` (a model whose prompts carry bidirectional spans: one program for steps
        with and without them); otherwise only steps with a token in a span do (a variant compiled on demand)."""
        self.pad_slot = max_num_seqs
        self.with_lora = with_lora
        self.mrope = mrope
        self.spans = spans
        self.page_tables = np.zeros((max_num_seqs + 1, max_pages_per_seq), np.int32)
        # The page list each slot's row was written from (a sequence's list only grows while it holds
        # its slot; preemption and finishing replace it), and how many of its pages the row holds.
        self._source: list[list[int] | None] = [None] * max_num_seqs
        self._written = [0] * max_num_seqs

    def _sync_pages(self, slot: int, pages: list[int]) -> None:
        written = min(self._written[slot], len(pages))
        if self._source[slot] is not pages:
            self._source[slot] = pages
            self.page_tables[slot] = 0
            written = 0
        # Speculation rolls back rejected drafts' tail pages, and the next schedule may allocate others in
        # their place before a step is built: rewrite the row from the first page that changed.
        while written and self.page_tables[slot, written - 1] != pages[written - 1]:
            written -= 1
        if written != len(pages):
            self.page_tables[slot, written : len(pages)] = pages[written:]
            self._written[slot] = len(pages)

    def build(self, scheduled: Seq[ScheduledSequence], shape: tuple[int, int, int]) -> StepInputs:
        """The arrays of one step over `scheduled` (each sequence holding a slot), padded to `shape`."""
        token_pad, seq_pad, page_pad = shape
        num_seqs = len(scheduled)
        starts, counts, known, slots, ids, adapters = [], [], [], [], [], []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            # The tokens the host knows; the rest (at most one) was sampled on the device.
            num_known = max(0, min(item.num_new_tokens, seq.num_known_tokens - start))
            if num_known:
                ids += seq.token_slice(start, start + num_known)
            if seq.spec_tokens:  # drafts follow the known tokens (speculation: every token is on the host)
                ids += seq.spec_tokens
                num_known += len(seq.spec_tokens)
            starts.append(start)
            counts.append(item.num_new_tokens)
            known.append(num_known)
            slots.append(seq.slot)
            adapters.append(seq.lora_slot)
            self._sync_pages(seq.slot, seq.pages)

        counts_a = np.asarray(counts, np.int32)
        ends = np.asarray(starts, np.int32) + counts_a
        cu = np.cumsum(counts_a, dtype=np.int32)
        num_tokens = int(cu[-1]) if num_seqs else 0
        owner = np.repeat(np.arange(num_seqs, dtype=np.int32), counts_a)  # [T] each token's sequence
        local = np.arange(num_tokens, dtype=np.int32) - (cu - counts_a)[owner]  # index inside its chunk
        fed = local >= np.asarray(known, np.int32)[owner]
        slots_a = np.asarray(slots, np.int32)

        input_ids = np.zeros(token_pad, np.int32)
        input_ids[:num_tokens][~fed] = ids
        feed = np.full(token_pad, -1, np.int32)
        feed[:num_tokens] = np.where(fed, slots_a[owner], -1)
        positions = np.zeros(token_pad, np.int32)
        positions[:num_tokens] = (ends - counts_a)[owner] + local
        seq_lens = np.zeros(token_pad, np.int32)
        seq_lens[:num_tokens] = ends[owner]
        cu_q_lens = np.full(seq_pad + 1, num_tokens, np.int32)
        cu_q_lens[0] = 0
        cu_q_lens[1 : num_seqs + 1] = cu
        kv_lens = np.zeros(seq_pad, np.int32)
        kv_lens[:num_seqs] = ends
        logits_indices = np.zeros(seq_pad, np.int32)
        logits_indices[:num_seqs] = cu - 1
        rows = np.full(seq_pad, self.pad_slot, np.int32)
        rows[:num_seqs] = slots_a
        page_tables = self.page_tables[rows, :page_pad]  # a copy: the next step may rewrite the rows
        visible_until = step_visible_until([item.seq.spans for item in scheduled], positions, cu_q_lens, self.spans)
        meta = PagedMetadata(cu_q_lens, kv_lens, page_tables, np.int32(num_seqs), visible_until)
        lora_slots = None
        if self.with_lora:
            lora_slots = np.full(token_pad, -1, np.int32)
            lora_slots[:num_tokens] = np.asarray(adapters, np.int32)[owner]
        rope = None if self.mrope is None else step_rope_positions(self.mrope, scheduled, positions, counts)
        batch = PagedBatch(positions=positions, seq_lens=seq_lens, meta=meta, slots=rows, rope_positions=rope)
        return StepInputs(input_ids, feed, batch, logits_indices, lora_slots)
