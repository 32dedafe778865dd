"""Reading optimized HLO text in tests: what a compiled step gathers."""

from __future__ import annotations

import math
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


def large_copies(hlo: str, min_elements: int) -> list[str]:
    """Instructions of optimized HLO text (fused ones included) that copy or slice out an array of at least
    `min_elements` elements: `copy`, `copy-start` and `dynamic-slice`."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= \w+\[([\d,]*)\]\S* (copy|copy-start|dynamic-slice)\(", line)
        if match and math.prod(int(d) for d in match.group(1).split(",") if d) >= min_elements:
            found.append(line.strip())
    return found
