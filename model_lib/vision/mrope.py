"""M-RoPE positions of a prompt with images (transformers' `get_rope_index` for the Qwen-VL family).

Text tokens advance one position on all three axes (temporal, height, width). An image whose
merged grid is `t x h x w` takes positions `start + (i_t, i_h, i_w)` over its tokens in
row-major order, and the text after it resumes at `start + max(h, w)`. Generated tokens
continue 1D from the prompt: token `i` past the prompt sits at `i + delta` on every axis,
with `delta = max(prompt positions) + 1 - prompt length` (transformers' `rope_deltas`).
Host-side numpy: the engine computes a sequence's positions once, at its first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ImageSpan:
    """An image's placeholder tokens `[offset, offset + t * h * w)` and its merged grid (t, h, w)."""

    offset: int
    grid: tuple[int, int, int]

    @property
    def length(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class MRopePositions:
    """A prompt's `[3, P]` positions and the offset of every later token (`delta`)."""

    prompt: np.ndarray  # [3, P] int32
    delta: int

    def window(self, start: int, count: int) -> np.ndarray:
        """Positions `[3, count]` of tokens `[start, start + count)` (prompt or generated)."""
        out = np.broadcast_to(np.arange(start, start + count, dtype=np.int32) + self.delta, (3, count)).copy()
        end = min(start + count, self.prompt.shape[1])
        if start < end:
            out[:, : end - start] = self.prompt[:, start:end]
        return out


def mrope_positions(num_tokens: int, spans: Sequence[ImageSpan]) -> MRopePositions:
    """The M-RoPE positions of a `num_tokens` prompt whose images sit at `spans` (in order, disjoint)."""
    pieces, cursor, position = [], 0, 0
    for span in sorted(spans, key=lambda s: s.offset):
        if span.offset < cursor or span.offset + span.length > num_tokens:
            raise ValueError(f"image span at {span.offset} ({span.length} tokens) overlaps another "
                             f"or runs past the prompt ({num_tokens} tokens)")
        text = span.offset - cursor
        pieces.append(np.broadcast_to(np.arange(text) + position, (3, text)))
        position += text
        t, h, w = span.grid
        grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
        pieces.append(grid + position)
        position += max(h, w)
        cursor = span.offset + span.length
    tail = num_tokens - cursor
    pieces.append(np.broadcast_to(np.arange(tail) + position, (3, tail)))
    prompt = np.concatenate(pieces, axis=1).astype(np.int32)
    delta = int(prompt.max()) + 1 - num_tokens if num_tokens else 0
    return MRopePositions(prompt, delta)
