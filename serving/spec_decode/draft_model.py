"""Draft-model proposals: a smaller model with the target's vocabulary, run by the same engine.

The draft has its own runner and KV page pool in the engine's process. Each proposal round
feeds every sequence the tokens its draft cache lacks (the prompt at first, then the tokens the
last verification kept), then decodes its drafts one step at a time, all sequences batched.
Draft KV of rejected drafts is dropped by lowering the view's progress to the longest prefix
the sequence kept. Drafts are drawn at the request's temperature (argmax when greedy), and the
distributions they came from go to the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model_lib import CausalLM
from serving.engine.kv_pages import PagePool
from serving.engine.runner import ModelRunner, bucket
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence
from serving.spec_decode.proposer import Proposal, ViewProposer
from serving.spec_decode.verify import DRAFT_STREAM, stream_keys


@dataclass(eq=False)
class DraftView:
    """What the draft runner sees of a sequence: its tokens (drafts so far included) and draft KV pages."""

    slot: int
    tokens: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_known: int = 0  # tokens of the sequence (not drafts) when the view was last synced
    spec_tokens: tuple = ()  # the draft runner's own steps carry no drafts
    lora_slot: int | None = None  # speculation refuses LoRA: the draft runs without adapters
    spans: tuple = ()  # draft steps attend causally (speculation is off for models with spans)

    @property
    def num_known_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]

    def sync(self, seq: Sequence) -> None:
        """Take the sequence's tokens; keep draft KV only for the drafts it accepted."""
        tokens = seq.tokens
        kept = self.num_known
        while kept < min(len(tokens), len(self.tokens)) and tokens[kept] == self.tokens[kept]:
            kept += 1
        self.num_computed = min(self.num_computed, kept, len(tokens) - 1)
        self.tokens, self.num_known = tokens, len(tokens)


@jax.jit
def draft_sample(logits: jax.Array, temperature: jax.Array, seeds: jax.Array, steps: jax.Array):
    """Draft tokens [S] (argmax where temperature is 0) and the distributions drawn from [S, V]."""
    logits = logits.astype(jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(stream_keys(seeds, steps, DRAFT_STREAM), scaled)
    tokens = jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    return tokens, jax.nn.softmax(scaled, axis=-1)


@partial(jax.jit, donate_argnums=(0,))
def _store(buffer: jax.Array, probs: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """Write probs [S, V] into buffer [R, K, V] at (rows, positions) (row R, out of range: dropped)."""
    return buffer.at[rows, positions].set(probs, mode="drop")


class DraftModelProposer(ViewProposer):
    view_class = DraftView

    def __init__(self, model: CausalLM, *, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, num_speculative_tokens: int,
                 scan_layers: bool | None = None):
        self.runner = ModelRunner(model, num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                  scan_layers=scan_layers)
        self.pool = PagePool(num_pages, page_size, enable_prefix_caching=False)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.vocab = model.config.vocab_size
        self.views: dict[Sequence, DraftView] = {}
        self.num_steps = 0  # draft model steps run

    def _view(self, seq: Sequence) -> DraftView:
        view = super()._view(seq)
        view.sync(seq)
        return view

    def propose(self, wanted: dict[Sequence, int]) -> Proposal:
        wanted = dict(wanted)  # lowered for sequences that run out of draft pages
        order = list(wanted)
        views = {seq: self._view(seq) for seq in order}
        drafts: dict[Sequence, list[int]] = {seq: [] for seq in order}
        sampling = any(seq.params.temperature > 0 for seq in order)
        num_rows = bucket(len(order), 1, self.max_num_seqs)
        probs = jnp.zeros((num_rows, self.num_speculative_tokens, self.vocab), jnp.float32) if sampling else None
        row_of = {seq: i for i, seq in enumerate(order)}
        pending = list(order)
        while pending:
            items = self._schedule(pending, views, wanted, drafts)
            if not items:
                break
            done = [(seq, item) for seq, item in items if item.completes_sequence]
            inputs = self.runner.prepare([item for _, item in items])
            logits = self.runner.run(inputs)
            self.num_steps += 1
            for _, item in items:
                item.seq.num_computed += item.num_new_tokens
            size = inputs.logits_indices.shape[0]
            temperature, seeds, steps = np.zeros(size, np.float32), np.zeros(size, np.uint32), np.zeros(size, np.int32)
            rows, positions = np.full(size, num_rows, np.int32), np.zeros(size, np.int32)
            index = {id(item): i for i, (_, item) in enumerate(items)}
            for seq, item in done:
                i = index[id(item)]
                temperature[i], seeds[i] = seq.params.temperature, seq.seed
                positions[i] = len(drafts[seq])
                steps[i] = len(seq.output_ids) + positions[i]  # the key of the output position drafted
                rows[i] = row_of[seq]
            tokens, drawn_from = draft_sample(logits, temperature, seeds, steps)
            if probs is not None:
                probs = _store(probs, drawn_from, rows, positions)
            tokens = np.asarray(tokens).tolist()
            for seq, item in done:
                token = tokens[index[id(item)]]
                drafts[seq].append(token)
                views[seq].tokens.append(token)
            pending = [seq for seq in pending if len(drafts[seq]) < wanted[seq]]
        return Proposal({seq: d for seq, d in drafts.items() if d}, probs, row_of)

    def _schedule(self, pending, views, wanted, drafts) -> list[tuple[Sequence, ScheduledSequence]]:
        """The next draft step: each pending view's missing tokens within the token budget."""
        budget, items = self.max_num_batched_tokens, []
        for seq in pending:
            view = views[seq]
            num_new = min(len(view.tokens) - view.num_computed, budget)
            if num_new <= 0:
                break
            needed = -(-(view.num_computed + num_new) // self.pool.page_size) - len(view.pages)
            if needed > self.pool.num_free():
                wanted[seq] = len(drafts[seq])  # no draft pages left: this sequence stops drafting
                continue
            if needed > 0:
                view.pages += self.pool.allocate(needed)
            items.append((seq, ScheduledSequence(view, num_new)))
            budget -= num_new
        return items
