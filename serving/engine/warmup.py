"""Start-up compilation: every shape a configuration can produce, and the persistent XLA cache.

Serving then never stops to compile: `warm_up` runs the model step once for each
(token bucket, sequence bucket, page-table bucket) shape (on accelerators the sequence bucket is tied to the token
bucket) and every sampler variant reachable with it (logprobs or not, penalties or
not; drawing, filtering and the grammar bitmask, all ones without a grammar, are decided on
the device), then the slot-row writers.
Warm-up steps hold no sequence, so what they write to the KV pages is never read.

The persistent compilation cache (`jax_compilation_cache_dir`) makes the second
start fast. It is on by default under the user cache directory; the environment
variable `JAXLLM_COMPILATION_CACHE_DIR` (or `EngineConfig.compilation_cache_dir`)
moves it, and an empty value turns it off.

Whether to warm up (`EngineConfig.enforce_eager` false) defaults to: yes on an
accelerator, no on the CPU backend. Scanned layer stacks make a shape's compile time
flat in depth, but the default configuration has 84 step shapes on an accelerator (12 token
x 7 page-table buckets) and 720 on the CPU backend (whose sequence and page-table buckets
start at one, `runner.py`), each compiled for tens of seconds on a small shared CPU, and
warm-up runs each one, the largest (2048 tokens, 256 sequences, 512 pages) gathering
gigabytes on the tiled attention path (benchmarks/RESULTS.md); on demand, a CPU
server compiles only the few shapes its traffic uses. Every compiled shape also holds memory mappings,
of which a process has a fixed number: warm-up stops before it would pass `executables.MAP_BUDGET`
of them (the SmolLM2-135M shape on the CPU reached the limit and aborted), and says so. `JAXLLM_ENFORCE_EAGER=1`/`0` sets the default
either way (the test suite sets 1); `serve --[no-]enforce-eager` overrides it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from serving.engine import executables
from serving.engine.runner import buckets
from serving.engine.sampler import batch_from_rows
from serving.engine.slot_state import sample_slots, write_counts, write_rows

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "JAXLLM_COMPILATION_CACHE_DIR"
ENFORCE_EAGER_ENV = "JAXLLM_ENFORCE_EAGER"


def should_warm_up(enforce_eager: bool | None) -> bool:
    """`enforce_eager` None: warm up unless the backend is the CPU."""
    return not enforce_eager if enforce_eager is not None else jax.default_backend() != "cpu"


def default_cache_dir() -> str:
    """`$JAXLLM_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxllm/xla` (~/.cache/jaxllm/xla); "" = off."""
    if CACHE_DIR_ENV in os.environ:
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "jaxllm" / "xla")


def use_compilation_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at `path` (None: the default; "": leave it off).

    JAX decides on its first compilation whether a cache is used, so call this before anything
    compiles (the CLI and `LLM` do, before loading the model).
    """
    path = default_cache_dir() if path is None else path
    if not path or jax.config.jax_compilation_cache_dir == path:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small sampler programs too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def warm_up(engine: LLMEngine, progress: bool = True) -> int:
    """Compile every step and sampler shape of `engine`'s configuration, stopping before the process's memory
    mappings would pass `executables.MAP_BUDGET` of its limit; returns the number of step shapes compiled."""
    from tqdm.auto import tqdm

    runner, num_slots = engine.runner, engine.config.max_num_seqs
    # M-RoPE positions, and `visible_until` where every step carries it (bidirectional spans)
    inputs_kind = dict(mrope=runner.inputs.mrope is not None, spans=runner.inputs.spans)
    shapes, expanded = runner.step_shapes(), set(runner.expanded_shapes())
    start = time.perf_counter()
    compiled, most_maps = 0, 0  # the most mappings one shape took so far (`executables.py`)
    for shape in tqdm(shapes, desc="compiling step shapes", unit="shape", disable=not progress):
        maps = executables.memory_maps()
        if maps is not None and not executables.within_map_budget(maps + most_maps):
            logger.warning(
                "warm-up stopped after %d of %d step shapes: the next would pass %.0f%% of the process's %s memory "
                "mappings (each compiled shape holds up to %d); the others compile when first run",
                compiled, len(shapes), 100 * executables.MAP_BUDGET, executables.map_limit(), most_maps,
            )
            break
        inputs = runner.empty_inputs(shape, **inputs_kind)
        runner.compiled_shapes.add(inputs.variant)
        logits = runner.run(inputs)
        if engine.images is not None and (merged := engine.images.empty(shape[0])) is not None:
            inputs = runner.empty_inputs(shape, **inputs_kind)  # the same shape with image rows
            inputs.merged = merged
            runner.compiled_shapes.add(inputs.variant)
            runner.run(inputs)
        if shape in expanded:  # the same shape with MLA rows in the expanded form
            inputs = runner.empty_inputs(shape, **inputs_kind)
            inputs.batch = inputs.batch.replace(expanded_from=np.int32(0))
            runner.compiled_shapes.add(inputs.variant)
            runner.run(inputs)
        slots = np.full(logits.shape[0], num_slots, np.int32)  # no slot: nothing is advanced
        bitmask = engine.masks.all_allowed(logits.shape[0])  # what every step passes, grammar or not
        for num_logprobs in (None, engine.max_logprobs):
            for use_penalties in (False, True):
                sampled, engine.slot_state, _ = sample_slots(
                    logits, engine.slot_state, runner.fed_tokens, slots, np.zeros(logits.shape[0], bool), bitmask,
                    num_logprobs=num_logprobs, use_penalties=use_penalties,
                )
        jax.block_until_ready(sampled.tokens)
        compiled += 1
        if maps is not None:
            most_maps = max(most_maps, executables.memory_maps() - maps)
    if engine.images is not None:
        engine.images.warm_up(runner)
    for size in buckets(1, num_slots):
        rows = batch_from_rows([], size, None, None)
        engine.slot_state = write_rows(engine.slot_state, np.full(size, num_slots, np.int32), rows)
    vocab = engine.model_config.vocab_size
    engine.slot_state = write_counts(engine.slot_state, np.int32(0), np.zeros(vocab, np.int32))
    jax.block_until_ready(engine.slot_state)
    logger.info("warm-up: %d step shapes compiled in %.1fs", compiled, time.perf_counter() - start)
    return compiled
