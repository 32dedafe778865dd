"""Bidirectional spans: runs of tokens of one sequence that attend to each other in both directions.

Gemma 3's image placeholder runs (transformers' `token_type_ids` mask) and SDAR's blocks of
`block_length` positions are spans; every other token stays causal. Attention takes them as
`visible_until`: per query token, the last key position it may see (its own position outside a
span, the span's last position inside one; `pallas_kernels/paged_attention/reference.py`).

Two ways to say where the spans are, one per batch shape:
- dense `[B, T]` batches: span ids (0: causal; a maximal run of one non-zero id is one span) ->
  `visible_until_from_span_ids` (jnp, traceable), passed as `CausalLM(..., visible_until=...)`;
- serving: `(start, end)` token ranges of a prompt (end exclusive) -> `visible_until_from_spans`
  (numpy, per sequence chunk), which `serving/engine/input_batch.py` fills into the step's
  `PagedMetadata.visible_until` (`serving/engine/spans.py`: checks, scheduling and prefix caching).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Span = tuple[int, int]  # [start, end) token positions of one sequence


def visible_until_from_span_ids(span_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """`[B, T]` span ids and positions -> `[B, T]` int32 `visible_until`: a token with a non-zero id sees up to
    the position of the last token of its run of that id; a token with id 0 sees up to its own position."""
    span_ids, positions = jnp.asarray(span_ids), jnp.asarray(positions, jnp.int32)
    length = span_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), span_ids.shape)
    run_ends = jnp.concatenate([span_ids[..., 1:] != span_ids[..., :-1], jnp.ones_like(span_ids[..., :1], bool)], -1)
    # Per token: the index of the first run end at or after it (a reversed running minimum).
    end = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(run_ends, index, length), -1), axis=span_ids.ndim - 1), -1)
    last = jnp.take_along_axis(positions, end, axis=-1)
    return jnp.where(span_ids != 0, last, positions)


def visible_until_from_spans(spans: Sequence[Span], positions: np.ndarray) -> np.ndarray:
    """`visible_until` (int32, positions' shape) of one sequence's tokens at `positions`, given its sorted,
    disjoint `spans`."""
    positions = np.asarray(positions, np.int32)
    if not spans:
        return positions.copy()
    starts = np.asarray([s for s, _ in spans], np.int32)
    ends = np.asarray([e for _, e in spans], np.int32)
    i = np.searchsorted(starts, positions, side="right") - 1  # the last span starting at or before each token
    inside = (i >= 0) & (positions < ends[np.maximum(i, 0)])
    return np.where(inside, ends[np.maximum(i, 0)] - 1, positions).astype(np.int32)
