"""Drafts fed by the target's hidden states: EAGLE-3 heads and MTP blocks (DeepSeek-V3, GLM-4.5).

The draft is one layer with its own KV pages (`model_lib/eagle3.py`, `model_lib/families/deepseek_mtp.py`).
Its position p takes the token at p + 1 and a hidden state for p, and its output `o_p` predicts the
token at p + 2. The target's step keeps the hidden states the draft reads (`ModelRunner.capture_hidden`):
EAGLE-3's three auxiliary layers, MTP's final normed state.

1. `observe`, after every target step: the draft runs over exactly the positions whose target KV the
   step kept (prefill chunks, and a decode's last token plus its accepted drafts), fed the step's
   hidden states, and writes their draft KV. The output at each sequence's last kept position
   (n - 2 for n known tokens) is its `anchor`, kept per slot on the device.
2. `propose`: draft 1 comes from the anchor's logits (it predicts token n); draft j + 1 from a draft
   step at position n - 1 + j fed draft j and the previous output. Those positions' KV is scratch: the
   next `observe` writes the kept ones again from the target's hidden states.

Prefix caching is off with these methods: a prefix served from the cache has no hidden states for
the draft to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serving.engine.input_batch import InputBatch, StepInputs
from serving.engine.kv_pages import PagePool
from serving.engine.runner import MIN_PAGE_BUCKET, bucket
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence
from serving.spec_decode.draft_model import _store, draft_sample
from serving.spec_decode.proposer import Proposal, ViewProposer


@dataclass(eq=False)
class HiddenView:
    """The draft's view of a sequence: the input token of each position (the sequence's next) and its pages."""

    slot: int
    tokens: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose draft KV was computed from the target's hidden states
    lost: bool = False  # out of draft pages (or out of step): it drafts no more until it leaves
    spec_tokens: tuple = ()
    lora_slot: int | None = None
    spans: tuple = ()  # draft steps attend causally (speculation is off for models with spans)

    @property
    def num_known_tokens(self) -> int:
        return len(self.tokens)

    num_tokens = num_known_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def _draft_step(graphdef, treedef, params, kv_cache, input_ids, hidden, batch, last_rows, *, from_target):
    """One draft forward over a ragged batch; (the output at each sequence's last row `[S_pad, E]`, its KV)."""
    draft = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    out, kv_cache = draft(input_ids, hidden, batch, kv_cache, from_target)
    return out[last_rows], kv_cache


def _draft_logits(graphdef, treedef, params, hidden):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, params)).logits(hidden)


@jax.jit
def _take_rows(source: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.take(source, rows, axis=0, mode="clip")


@partial(jax.jit, donate_argnums=(0,))
def _put_rows(buffer: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """buffer[rows] = values (rows out of range: dropped)."""
    return buffer.at[rows].set(values.astype(buffer.dtype), mode="drop")


class HiddenStateProposer(ViewProposer):
    view_class = HiddenView

    def __init__(self, draft: nnx.Module, *, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, num_speculative_tokens: int,
                 min_token_bucket: int):
        graphdef, state = nnx.split(draft)
        self.params, treedef = jax.tree.flatten(state)
        self._step = jax.jit(partial(_draft_step, graphdef, treedef), donate_argnums=(1,),
                             static_argnames=("from_target",))
        self._logits = jax.jit(partial(_draft_logits, graphdef, treedef))
        dtype = jnp.dtype(draft.config.dtype)
        self.kv_cache = draft.make_kv_cache(num_pages, page_size, dtype)
        self.pool = PagePool(num_pages, page_size, enable_prefix_caching=False)
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.inputs = InputBatch(max_num_seqs, self.max_pages_per_seq)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.min_token_bucket = min_token_bucket
        self.num_speculative_tokens = num_speculative_tokens
        self.vocab = draft.config.vocab_size
        self.anchor = jnp.zeros((max_num_seqs + 1, draft.hidden_size), dtype)  # per slot; the last row: padding
        self.views: dict[Sequence, HiddenView] = {}
        self.num_steps = 0  # draft forwards run (catch-up and drafting)

    def _reserve(self, view: HiddenView, num_positions: int) -> bool:
        """Pages for the view's first `num_positions` positions; False (and the view is lost) when none are left."""
        needed = -(-num_positions // self.pool.page_size) - len(view.pages)
        if needed > self.pool.num_free():
            view.lost = True
            return False
        if needed > 0:
            view.pages += self.pool.allocate(needed)
        return True

    def _build(self, items: list[ScheduledSequence]) -> StepInputs:
        num_tokens = sum(item.num_new_tokens for item in items)
        tokens = bucket(max(num_tokens, len(items)), self.min_token_bucket, self.max_num_batched_tokens)
        pages = bucket(max(len(item.seq.pages) for item in items), MIN_PAGE_BUCKET, self.max_pages_per_seq)
        return self.inputs.build(items, (tokens, min(tokens, self.max_num_seqs), pages))

    def _run(self, inputs: StepInputs, hidden: jax.Array, from_target: bool) -> jax.Array:
        out, self.kv_cache = self._step(self.params, self.kv_cache, inputs.input_ids, hidden, inputs.batch,
                                        inputs.logits_indices, from_target=from_target)
        self.num_steps += 1
        return out

    def observe(self, scheduled: list[ScheduledSequence], inputs: StepInputs, hidden: jax.Array | None) -> None:
        """Draft KV for the positions the target step kept, fed its hidden states; anchors updated."""
        cu, positions = inputs.batch.meta.cu_q_lens, inputs.batch.positions
        items, rows = [], []
        for i, item in enumerate(scheduled):
            seq = item.seq
            if seq.finished:
                self.release(seq)
                continue
            start = int(positions[cu[i]])
            kept = seq.num_computed - start
            if kept <= 0:
                continue
            view = self._view(seq)
            view.num_computed = min(view.num_computed, start)  # a recomputed prefix (preemption) is written again
            if view.lost or view.num_computed != start or not self._reserve(view, start + kept):
                view.lost = True  # a gap: positions the draft never saw
                continue
            view.tokens = seq.tokens[1:]
            items.append(ScheduledSequence(view, kept))
            rows.append(np.arange(cu[i], cu[i] + kept, dtype=np.int32))
        if not items:
            return
        step = self._build(items)
        index = np.zeros(step.input_ids.shape[0], np.int32)
        flat = np.concatenate(rows)
        index[: flat.shape[0]] = flat
        out = self._run(step, _take_rows(hidden, index), from_target=True)
        self.anchor = _put_rows(self.anchor, step.batch.slots, out)
        for item in items:
            item.seq.num_computed += item.num_new_tokens

    def propose(self, wanted: dict[Sequence, int]) -> Proposal:
        order = [seq for seq in wanted if self._ready(seq)]
        if not order:
            return Proposal()
        num_rows = bucket(len(order), 1, self.max_num_seqs)
        row_of = {seq: i for i, seq in enumerate(order)}
        temperature, seeds = np.zeros(num_rows, np.float32), np.zeros(num_rows, np.uint32)
        slots = np.full(num_rows, self.max_num_seqs, np.int32)
        for seq, i in row_of.items():
            temperature[i], seeds[i], slots[i] = seq.params.temperature, seq.seed, seq.slot
        sampling = bool((temperature > 0).any())
        probs = jnp.zeros((num_rows, self.num_speculative_tokens, self.vocab), jnp.float32) if sampling else None
        drafts: dict[Sequence, list[int]] = {seq: [] for seq in order}
        hidden = _take_rows(self.anchor, slots)  # row i: the output that predicts sequence order[i]'s next draft
        active = list(order)
        for j in range(max(wanted[seq] for seq in order)):
            steps = np.asarray([len(seq.output_ids) + j for seq in order] + [0] * (num_rows - len(order)), np.int32)
            tokens, drawn_from = draft_sample(self._logits(self.params, hidden), temperature, seeds, steps)
            if probs is not None:
                live = np.full(num_rows, num_rows, np.int32)
                live[[row_of[seq] for seq in active]] = [row_of[seq] for seq in active]
                probs = _store(probs, drawn_from, live, np.full(num_rows, j, np.int32))
            tokens = np.asarray(tokens)
            for seq in active:
                drafts[seq].append(int(tokens[row_of[seq]]))
            active = [seq for seq in active if len(drafts[seq]) < wanted[seq]
                      and self._reserve(self.views[seq], seq.num_tokens + j)]
            if not active:
                break
            hidden = self._draft_forward(active, drafts, row_of, hidden, j)
        for seq in order:
            view = self.views[seq]
            view.num_computed, view.lost = seq.num_computed, False  # drafting positions were scratch
        return Proposal(drafts, probs, row_of)

    def _ready(self, seq: Sequence) -> bool:
        view = self.views.get(seq)
        return view is not None and not view.lost and view.slot == seq.slot and view.num_computed == seq.num_computed

    def _draft_forward(self, active, drafts, row_of, hidden, j: int) -> jax.Array:
        """Draft step j: each active sequence's position n - 1 + j, fed its draft j and the output before it."""
        items = []
        for seq in active:
            view = self.views[seq]
            view.tokens = seq.tokens[1:] + drafts[seq]
            view.num_computed = seq.num_tokens - 1 + j
            items.append(ScheduledSequence(view, 1))
        step = self._build(items)
        rows = np.full(step.logits_indices.shape[0], hidden.shape[0], np.int32)
        rows[: len(active)] = [row_of[seq] for seq in active]
        inputs = _take_rows(hidden, np.pad(rows[: len(active)], (0, step.input_ids.shape[0] - len(active))))
        out = self._run(step, inputs, from_target=False)
        return _put_rows(hidden, rows, out[: rows.shape[0]])
