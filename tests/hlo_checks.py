"""Reading optimized HLO text in tests: what a compiled step gathers."""

from __future__ import annotations

import re


def all_gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Result shapes of every all-gather in optimized HLO text."""
    shapes = set()
    for line in hlo.splitlines():
        lhs, _, rhs = line.partition(" = ")
        if re.match(r"\(?\w+\[[\d,]*\]", rhs) and re.search(r"\ball-gather(-start)?\(", rhs):
            result = rhs.split(" all-gather")[0]
            shapes.update(tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", result))
    return shapes
