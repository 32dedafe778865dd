"""Fixed per-request token masks (Whisper's suppressed tokens, its language detection), as bitmask rows
that the engine combines with any grammar's row (`serving/structured/bitmask.py` layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from serving.structured.compiler import bitmask_width


def _row(vocab_size: int, tokens: Iterable[int], allow: bool) -> np.ndarray:
    """A [W] int32 row allowing only `tokens` (`allow`) or everything but them."""
    bits = np.zeros(bitmask_width(vocab_size) * 32, bool)
    bits[:vocab_size] = not allow
    chosen = np.asarray(sorted(set(tokens)), np.int64)
    if chosen.size and not (0 <= chosen.min() and chosen.max() < vocab_size):
        raise ValueError(f"masked token ids must be in [0, {vocab_size})")
    bits[chosen] = allow
    return np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view("<i4").reshape(-1)


@dataclass(frozen=True, eq=False)
class TokenMasks:
    """What a request's sampled tokens keep to: row `first` for its first generated token, `rest` after."""

    first: np.ndarray  # [W] int32
    rest: np.ndarray

    @classmethod
    def suppressing(cls, vocab_size: int, always: Iterable[int], at_begin: Iterable[int] = ()) -> "TokenMasks":
        """Never `always`; not `at_begin` as the first token either (transformers' SuppressTokens and
        SuppressTokensAtBegin logits processors)."""
        always = list(always)
        return cls(_row(vocab_size, [*always, *at_begin], allow=False), _row(vocab_size, always, allow=False))

    @classmethod
    def allowing(cls, vocab_size: int, tokens: Iterable[int]) -> "TokenMasks":
        row = _row(vocab_size, tokens, allow=True)
        return cls(row, row)

    def row(self, num_generated: int) -> np.ndarray:
        return self.first if num_generated == 0 else self.rest


def combine(row: np.ndarray | None, other: np.ndarray) -> np.ndarray:
    """Tokens both rows allow (`row` None: `other`)."""
    return other if row is None else np.bitwise_and(row, other)


__all__ = ["TokenMasks", "combine"]
