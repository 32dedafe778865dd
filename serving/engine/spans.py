"""Bidirectional spans of a prompt in the engine: checks, chunking, prefix caching and the step's array.

A request may carry `(start, end)` token ranges of its prompt (end exclusive) whose tokens attend to
each other in both directions (`model_lib/spans.py`). A span's later keys are written in the step
that reads them, so a span is computed whole in one step:
- `check_spans` (at `add_request`): sorted, disjoint, inside the prompt, none longer than
  `max_num_batched_tokens`;
- `span_cut` (the scheduler): a prefill chunk stops before a span it would split;
- `computed_prefix_end` (prefix-cache hits and recompute): a cached prefix that ends inside a span is
  cut back to the span's start;
- `span_page_tags`: a page's prefix-cache key names the spans overlapping it and the tokens past the
  page those spans let it see, since its KV depends on them;
- `step_visible_until` (the input batch): the step's `visible_until [T]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_lib.spans import Span, visible_until_from_spans


def check_spans(spans: Sequence[Sequence[int]], num_tokens: int, max_len: int) -> tuple[Span, ...]:
    """`spans` as sorted `(start, end)` int pairs; ValueError naming the span unless each is a non-empty range
    inside `[0, num_tokens)`, no two overlap, and none is longer than `max_len` (the tokens one step takes)."""
    out = []
    for span in spans:
        if len(span) != 2:
            raise ValueError(f"a bidirectional span is a (start, end) pair, got {span!r}")
        start, end = (int(x) for x in span)
        if not 0 <= start < end <= num_tokens:
            raise ValueError(f"bidirectional span ({start}, {end}) is not a non-empty range of the prompt's "
                             f"{num_tokens} tokens (end exclusive)")
        if end - start > max_len:
            raise ValueError(f"bidirectional span ({start}, {end}) has {end - start} tokens, more than one step takes "
                             f"(max_num_batched_tokens={max_len}); a span is computed in one step")
        out.append((start, end))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 < e0:
            raise ValueError(f"bidirectional spans ({s0}, {e0}) and ({s1}, {e1}) overlap")
    return tuple(out)


def span_cut(spans: Sequence[Span], start: int, num_new: int) -> int:
    """Tokens of the chunk `[start, start + num_new)` to compute so that it splits no span: the chunk stops
    before the first span it would cut (0 when that span starts the chunk)."""
    end = start + num_new
    for s, e in spans:
        if s >= end:
            break
        if start <= s and end < e:
            return s - start
    return num_new


def computed_prefix_end(spans: Sequence[Span], num_computed: int) -> int:
    """`num_computed` (a cached prefix's length) moved back to the start of the span it ends strictly inside."""
    for s, e in spans:
        if s < num_computed < e:
            return s
    return num_computed


def span_page_tags(spans: Sequence[Span], tokens: Sequence[int], page_size: int):
    """Page index -> the prefix-cache tag of the spans overlapping that page: each span's range and the tokens
    past the page that it makes visible to the page's tokens (`kv_pages.PageTags`)."""

    def tags(page: int) -> tuple:
        start, end = page * page_size, (page + 1) * page_size
        overlapping = tuple((s, e, tuple(tokens[end:e])) for s, e in spans if s < end and e > start)
        return (("spans", *overlapping),) if overlapping else ()

    return tags


def step_visible_until(spans_of: Sequence[Sequence[Span]], positions: np.ndarray, cu_q_lens: np.ndarray,
                       always: bool) -> np.ndarray | None:
    """The step's `visible_until [T_pad]` (padding rows 0) for its sequences' `spans_of` and token `positions`
    (sequence after sequence, `cu_q_lens` offsets); None when no token sits in a span, unless `always`."""
    visible, found = None, False
    for k, spans in enumerate(spans_of):
        if not spans:
            continue
        rows = slice(cu_q_lens[k], cu_q_lens[k + 1])
        until = visible_until_from_spans(spans, positions[rows])
        if not (until != positions[rows]).any():
            continue
        if visible is None:
            visible = _own_positions(positions, cu_q_lens[len(spans_of)])
        visible[rows] = until
        found = True
    if not found and always:
        return _own_positions(positions, cu_q_lens[len(spans_of)])
    return visible


def _own_positions(positions: np.ndarray, num_tokens: int) -> np.ndarray:
    """Every token causal: its own position (padding rows 0)."""
    visible = np.zeros(positions.shape[0], np.int32)
    visible[:num_tokens] = positions[:num_tokens]
    return visible
