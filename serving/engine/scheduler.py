"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step fills a token budget (`max_num_batched_tokens`) under a cap on running
sequences (`max_num_seqs`): running sequences first (one token each when
decoding, the next chunk while still prefilling), then waiting ones in arrival
order. A prompt longer than what is left of the budget is split into chunks over
several steps. A sequence first looks its prompt up in the prefix cache and
skips the pages it finds. When pages run out, the most recently started running
sequence is preempted: its pages go back to the pool and it waits at the front
of the queue, to be recomputed (cheaply, if its pages survive in the prefix
cache).

Steps run asynchronously (see `LLMEngine.step`): a sequence may have a token
sampled on the device that the host has not read (`num_pending`). It is
scheduled on top of that token, except when that token already reaches its
max_tokens; and a preempted sequence waits until its pending token is read,
since recomputing needs every token on the host.

A prompt's bidirectional spans (`serving/engine/spans.py`) are computed whole in one step: a chunk
stops before a span it would split, a running prefill held back that way goes first in the next
step (the whole budget, which no span exceeds, is there for it), and a prefix-cache hit that ends
inside a span is cut back to the span's start.

A running sequence holds one of `max_num_seqs` slots (its row of the device
sampling state); `take_joined` names those that joined since the last call.

Retiring a sequence is O(1): running sequences sit in an insertion-ordered
dict, and a waiting one that finishes (an abort) is only marked, then dropped
when it reaches the head of the queue.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from serving.engine.kv_pages import PagePool, PageTags, next_page_key
from serving.engine.sequence import Sequence, Status
from serving.engine.spans import computed_prefix_end, span_cut, span_page_tags
from serving.multimodal.inputs import encoder_cut, page_tags

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this step every token has KV, so the last token's logits give the next token."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens + len(self.seq.spec_tokens)


class Scheduler:
    def __init__(
        self, pool: PagePool, *, max_num_seqs: int, max_num_batched_tokens: int, encoder_budget: int | None = None
    ):
        """`encoder_budget`: image feature rows the step may compute (None: a text-only model)."""
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.encoder_budget = encoder_budget
        self._encoder_left = 0
        self.waiting: deque[Sequence] = deque()  # may hold finished sequences, skipped at the head
        self.running: dict[Sequence, None] = {}  # in start order
        self.num_waiting = 0  # unfinished sequences in `waiting`
        self.num_preemptions = 0
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self._joined: list[Sequence] = []
        self._span_first: Sequence | None = None  # a running prefill held back by a span: first next step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting += 1

    def has_work(self) -> bool:
        return bool(self.num_waiting or self.running)

    def _waiting_head(self) -> Sequence | None:
        while self.waiting and self.waiting[0].finished:
            self.waiting.popleft()
        return self.waiting[0] if self.waiting else None

    def _pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.pool.page_size)
        return max(0, total - len(seq.pages))

    def take_joined(self) -> list[Sequence]:
        """Sequences that took a slot since the last call (their device rows need writing)."""
        joined, self._joined = [s for s in self._joined if s.slot is not None], []
        return joined

    def _leave(self, seq: Sequence) -> None:
        del self.running[seq]
        self._free_slots.append(seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._leave(seq)
        self.pool.release(seq.pages)
        seq.pages, seq.page_keys, seq.num_computed, seq.spec_tokens = [], [], 0, []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_waiting += 1
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def _fit_encoder(self, seq: Sequence, num_new: int) -> int:
        """`num_new` cut before the first image whose features would exceed the step's encoder budget; 0 for a
        sequence whose whole encoder input (an encoder-decoder's source, Mllama's images) runs as it starts and
        does not fit in what is left of it."""
        if seq.encoder_len:
            if seq.num_computed == 0:
                if seq.encoder_len > self._encoder_left:
                    return 0
                self._encoder_left -= seq.encoder_len
            return num_new
        if not seq.images:
            return num_new
        num_new, spent = encoder_cut(seq.images, seq.num_computed, num_new, self._encoder_left)
        self._encoder_left -= spent
        return num_new

    def _fit(self, seq: Sequence, num_new: int) -> int:
        """`num_new` cut so that the chunk splits no bidirectional span and its images fit the encoder budget."""
        if seq.spans:
            num_new = span_cut(seq.spans, seq.num_computed, num_new)
        num_new = self._fit_encoder(seq, num_new)
        if seq.spans:  # the encoder cut may fall inside a span
            num_new = span_cut(seq.spans, seq.num_computed, num_new)
        return num_new

    def _match_prefix(self, seq: Sequence) -> None:
        """Take the cached pages of the prompt's longest cached prefix, always leaving the last token to compute
        (it gives the logits) and never ending inside a bidirectional span (computed whole in one step)."""
        page_size = self.pool.page_size
        seq.pages, seq.page_keys = self.pool.match_prefix(seq.tokens, seq.num_tokens - 1, seq.cache_salt,
                                                           self._page_tags(seq))
        seq.num_computed = len(seq.pages) * page_size
        keep = computed_prefix_end(seq.spans, seq.num_computed) // page_size
        if keep < len(seq.pages):
            self.pool.return_matched(seq.pages[keep:])
            del seq.pages[keep:], seq.page_keys[keep:]
            seq.num_computed = keep * page_size

    def _page_tags(self, seq: Sequence) -> PageTags | None:
        page_size = self.pool.page_size
        images = page_tags(seq.images, page_size) if seq.images else None
        spans = span_page_tags(seq.spans, seq.prompt_ids, page_size) if seq.spans else None
        if images is None or spans is None:
            return images or spans
        return lambda page: images(page) + spans(page)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        self._encoder_left = self.encoder_budget or 0

        order = list(self.running)
        if self._span_first is not None and self._span_first.status is Status.RUNNING:
            order.remove(self._span_first)  # the whole budget is there for its span
            order.insert(0, self._span_first)
        self._span_first = None
        for seq in order:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if seq.at_token_limit:
                continue  # its last token is on the way
            missing = seq.num_tokens - seq.num_computed
            wanted = min(missing + len(seq.spec_tokens), budget)
            num_new = self._fit(seq, wanted)
            del seq.spec_tokens[max(0, num_new - missing):]  # drafts beyond the budget are not verified
            if not num_new:
                if self._span_first is None and seq.spans and not span_cut(seq.spans, seq.num_computed, wanted):
                    self._span_first = seq
                continue  # its next image waits for the next step's encoder budget, or its span for budget
            needed = self._pages_needed(seq, num_new)  # 0 for most decode steps: nothing to allocate
            if needed:
                while needed > self.pool.num_free():
                    victim = next(reversed(self.running))
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue
                seq.pages += self.pool.allocate(needed)  # in place: `InputBatch` knows a slot's rows by this list
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

        while budget > 0 and len(self.running) < self.max_num_seqs and (seq := self._waiting_head()) is not None:
            if seq.num_pending:
                break  # preempted with a token still on the way: recompute once it is read
            if not seq.pages:
                self._match_prefix(seq)
            num_new = self._fit(seq, min(seq.num_tokens - seq.num_computed, budget))
            needed = self._pages_needed(seq, num_new)
            if not num_new or needed > self.pool.num_free():
                self.pool.release(seq.pages)
                seq.pages, seq.page_keys, seq.num_computed = [], [], 0
                break
            seq.pages += self.pool.allocate(needed)
            self.waiting.popleft()
            self.num_waiting -= 1
            seq.status = Status.RUNNING
            self.running[seq] = None
            seq.slot = self._free_slots.pop()
            self._joined.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

    def update_after_step(self, scheduled: list[ScheduledSequence]) -> None:
        """Advance progress (the step is dispatched) and name the pages that became full."""
        for item in scheduled:
            item.seq.num_computed += item.num_new_tokens
            self.register_full_pages(item.seq)

    def roll_back(self, seq: Sequence) -> None:
        """Drop the KV of tokens the sequence did not keep (rejected drafts): its progress, and the pages
        past the one its next token goes to. A no-op without speculation."""
        keep_tokens = seq.num_tokens - 1
        if seq.num_computed <= keep_tokens:
            return
        seq.num_computed = keep_tokens
        keep = -(-seq.num_tokens // self.pool.page_size)
        self.pool.release(seq.pages[keep:])
        del seq.pages[keep:]  # in place: `InputBatch` knows a slot's rows by this list

    def register_full_pages(self, seq: Sequence) -> None:
        """Name the pages whose tokens are all computed and known (read back from the device)."""
        if not self.pool.enable_prefix_caching:
            return  # keys only serve prefix matching
        page_size = self.pool.page_size
        full = min(min(seq.num_computed, seq.num_known_tokens) // page_size, len(seq.pages))
        tags = self._page_tags(seq)
        while len(seq.page_keys) < full:
            i = len(seq.page_keys)
            previous = seq.page_keys[-1] if seq.page_keys else None
            key = next_page_key(previous, seq.token_slice(i * page_size, (i + 1) * page_size), seq.cache_salt,
                                tags(i) if tags is not None else ())
            seq.page_keys.append(key)
            self.pool.register(seq.pages[i], key)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Retire a sequence (finished or aborted) and give its pages back."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self._leave(seq)
        else:
            self.num_waiting -= 1  # left in the queue, dropped when it reaches the head
            if not self.num_waiting:
                self.waiting.clear()
        self.pool.release(seq.pages)
        seq.pages = []
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
