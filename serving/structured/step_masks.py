"""The engine's grammar side: the compiler of its tokenizer (built on the first structured request) and
each step's token bitmask.

Steps without a grammar pass an all-ones mask made once per step size and kept on the device, so
one compiled sampler serves every step (no transfer, one select over the logits).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import jax
import numpy as np

from serving.structured.bitmask import ALL_ALLOWED, fill_bitmask
from serving.structured.compiler import GrammarCompiler, bitmask_width


class StepMasks:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]):
        self._tokenizer, self._stop_token_ids = tokenizer, tuple(stop_token_ids)
        self.width = bitmask_width(vocab_size)
        self.vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._all_allowed: dict[int, jax.Array] = {}

    @property
    def compiler(self) -> GrammarCompiler:
        """xgrammar over the engine's tokenizer, built on first use; thread-safe (servers compile while validating)."""
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self._tokenizer, self.vocab_size, self._stop_token_ids)
            return self._compiler

    def row(self, matcher: Any) -> np.ndarray:
        """The [W] mask row of a sequence whose matcher has read all its tokens."""
        return fill_bitmask([(0, matcher)], 1, self.width)[0]

    def draft_rows(self, matcher: Any, drafts: list[int], keep_rejected: bool) -> tuple[np.ndarray, int]:
        """Mask rows to verify a sequence's drafts, and how many drafts to verify.

        Row j allows what may follow the sequence's tokens and drafts[:j] (the matcher has read
        every token of the sequence and is left so). The drafts stop at the first one the grammar
        rejects (kept when `keep_rejected`: a drawn draft must be tested and rejected, not dropped,
        for the residual draw to stay exact; its row forbids it) or after one that ends the grammar.
        Rows past the last filled one allow everything (no output comes from them).
        """
        rows = np.full((len(drafts) + 1, self.width), ALL_ALLOWED, np.int32)
        taken = 0
        try:
            for j, token in enumerate(drafts):
                matcher.fill_next_token_bitmask(rows, j)
                if not matcher.accept_token(token):
                    return rows, taken + int(keep_rejected)
                taken += 1
                if matcher.is_terminated():
                    return rows, taken
            matcher.fill_next_token_bitmask(rows, len(drafts))
            return rows, taken
        finally:
            matcher.rollback(taken)

    def step(self, rows: dict[int, np.ndarray], num_rows: int) -> np.ndarray | None:
        """The step's [num_rows, W] bitmask from the constrained rows (by row index); None when there are none."""
        if not rows:
            return None
        mask = fill_bitmask((), num_rows, self.width)
        for i, row in rows.items():
            mask[i] = row
        return mask

    def all_allowed(self, num_rows: int) -> jax.Array:
        """The all-ones [num_rows, W] mask on the device, made once per step size."""
        mask = self._all_allowed.get(num_rows)
        if mask is None:
            mask = self._all_allowed[num_rows] = jax.device_put(fill_bitmask((), num_rows, self.width))
        return mask
