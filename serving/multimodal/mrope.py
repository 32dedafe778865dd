"""M-RoPE positions of a serving step: each token's (temporal, height, width) position, `[3, T_pad]`.

A sequence's prompt positions are computed once from its image items (`model_lib/vision/mrope.py`)
and kept on the sequence; generated tokens continue at `index + delta`. A text-only sequence
has delta 0, so its rows equal the 1D positions. Preemption recomputes the same positions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from model_lib.vision.mrope import ImageSpan, MRopePositions, mrope_positions
from model_lib.vision.qwen_vl import QwenVLConfig
from serving.multimodal.inputs import ImageItem


def item_positions(config: QwenVLConfig, num_prompt_tokens: int, items: Sequence[ImageItem]) -> MRopePositions:
    """A prompt's M-RoPE positions from its image items (pixels shaped `[t, h, w, ...]` by their grid)."""
    spans = [ImageSpan(item.offset, config.merged_grid(item.pixel_values.shape[:3])) for item in items]
    return mrope_positions(num_prompt_tokens, spans)


def step_rope_positions(
    config: QwenVLConfig, scheduled: Sequence, positions: np.ndarray, counts: Sequence[int]
) -> np.ndarray:
    """`[3, T_pad]` positions of a step whose sequences' chunks follow one another in `scheduled` order;
    `positions [T_pad]` are the 1D ones (what padding and text-only sequences keep)."""
    rope = np.broadcast_to(positions, (3, positions.shape[0])).copy()
    offset = 0
    for item, count in zip(scheduled, counts):
        seq = item.seq
        if seq.images:
            if seq.mrope is None:
                seq.mrope = item_positions(config, len(seq.prompt_ids), seq.images)
            rope[:, offset : offset + count] = seq.mrope.window(seq.num_computed, count)
        offset += count
    return rope
