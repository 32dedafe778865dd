"""Keeping JAX's compiled programs within the process's limit on memory mappings.

Every XLA:CPU executable keeps its JIT-compiled kernels in mappings of their own (code, constants and data of
each kernel: about 270 for a step of a 6-layer model, more for deeper ones; benchmarks/RESULTS.md), and JAX's
caches keep every compiled shape alive. Linux caps a process's mappings (`vm.max_map_count`, 65530 by default);
at the cap LLVM cannot place a new kernel and aborts the process ("LLVM ERROR: Unable to allocate section
memory!"). A CPU server compiling shapes on demand reaches it after some tens of shapes of a 30-layer model, and
warming up all of a CPU configuration's shapes reaches it at start. So before a new step shape compiles, the
runner (and the pooling engine, before a new batch shape) drops JAX's compiled programs once the process holds
`MAP_BUDGET` of its limit (the shapes in use compile again, from the persistent compilation cache when it is
on), and warm-up stops before the budget (`warmup.py`).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

MAP_BUDGET = 0.75  # of vm.max_map_count: room left for the compilation that comes next and for other libraries
_MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
_MAPS = Path("/proc/self/maps")


def map_limit() -> int | None:
    """The most memory mappings a process may hold (`vm.max_map_count`); None where the system does not say."""
    try:
        return int(_MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return None


def memory_maps() -> int | None:
    """The memory mappings this process holds; None where the system does not say (not Linux)."""
    try:
        with _MAPS.open("rb") as maps:
            return maps.read().count(b"\n")
    except OSError:
        return None


def within_map_budget(maps: int, budget: float = MAP_BUDGET) -> bool:
    """Whether holding `maps` mappings stays within `budget` of the limit (always, where there is no limit)."""
    limit = map_limit()
    return limit is None or maps <= budget * limit


def make_room_for(shape: tuple, compiled_shapes: set[tuple]) -> None:
    """Before `shape` runs: if it is new (not in `compiled_shapes`, so it compiles now) and the process is past the
    budget, drop the compiled programs and forget `compiled_shapes` (all of them compile again)."""
    if shape not in compiled_shapes and release_executables_near_map_limit():
        compiled_shapes.clear()


def release_executables_near_map_limit(budget: float = MAP_BUDGET) -> bool:
    """Drop JAX's compiled programs (and their mappings) if the process holds more than `budget` of its limit;
    whether it did."""
    maps = memory_maps()
    if maps is None or within_map_budget(maps, budget):
        return False
    jax.clear_caches()
    gc.collect()
    logger.warning(
        "%d memory mappings of at most %s: dropped JAX's compiled programs, which compile again when next run. "
        "Fewer step shapes (a larger min_token_bucket or max_num_batched_tokens, tight buckets off) or a larger "
        "vm.max_map_count (sysctl) avoid it", maps, map_limit(),
    )
    return True
