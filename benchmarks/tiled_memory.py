"""Temporary memory of the CPU attention path (`tiled.py`) at the largest step shapes, by XLA's own count.

Compiles (nothing runs, nothing is allocated: abstract arguments) the attention of one layer at
the largest step shapes of the default serving configuration (2048 tokens / 256 sequences for a
prefill-heavy step, 256 tokens / 256 sequences for a decode step, 512 pages of 16 per sequence)
for the SmolLM2-135M head layout, and reports `memory_analysis().temp_size_in_bytes` with the
blocked path (the default `GATHER_BYTES`) and with every tile at once (the budget lifted), in one
process. `--time` also runs one step shape that fits either way (64 sequences at full context),
both ways interleaved, and prints the best seconds of each.

    PYTHONPATH=. python -m benchmarks.tiled_memory [--time]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import PagedMetadata, tiled


def temp_bytes(tokens: int, seqs: int, pages: int, page_size: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, float]:
    """(temporary bytes, compile seconds) of the tiled attention at this shape, float32."""
    f32, i32 = jnp.float32, jnp.int32
    num_pages = seqs * pages
    q = jax.ShapeDtypeStruct((tokens, heads, head_dim), f32)
    cache = jax.ShapeDtypeStruct((kv_heads, num_pages, page_size, head_dim), f32)
    meta = PagedMetadata(jax.ShapeDtypeStruct((seqs + 1,), i32), jax.ShapeDtypeStruct((seqs,), i32),
                         jax.ShapeDtypeStruct((seqs, pages), i32), jax.ShapeDtypeStruct((), i32))
    start = time.perf_counter()
    compiled = jax.jit(partial(tiled.paged_attention, scale=0.125)).lower(q, cache, cache, meta).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def seconds_both_ways(tokens: int, seqs: int, pages: int, page_size: int, repeats: int = 5) -> tuple[float, float]:
    """Best seconds of the tiled attention at this shape (every sequence at full context), all tiles at once
    and in blocks, run interleaved; SmolLM2-135M heads, float32."""
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.standard_normal((tokens, 9, 64)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((3, seqs * pages, page_size, 64)), jnp.float32)
    per_seq = tokens // seqs
    meta = PagedMetadata(jnp.arange(seqs + 1, dtype=jnp.int32) * per_seq, jnp.full(seqs, pages * page_size, jnp.int32),
                         jnp.asarray(rng.permutation(seqs * pages).reshape(seqs, pages), jnp.int32), jnp.int32(seqs))
    budget, runs = tiled.GATHER_BYTES, {}
    for name, limit in (("whole", 1 << 62), ("blocks", budget)):
        tiled.GATHER_BYTES = limit  # read at trace time: each jitted function keeps its own path
        runs[name] = jax.jit(partial(tiled.paged_attention, scale=0.125)).lower(q, cache, cache, meta).compile()
    tiled.GATHER_BYTES = budget
    outs = {name: run(q, cache, cache, meta) for name, run in runs.items()}
    np.testing.assert_allclose(outs["blocks"], outs["whole"], rtol=1e-5, atol=1e-5)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(q, cache, cache, meta).block_until_ready()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["whole"], best["blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--time", action="store_true", help="also time a shape that fits both ways")
    args = parser.parse_args()
    budget = tiled.GATHER_BYTES
    print(f"jax {jax.__version__}; SmolLM2-135M heads 9/3, head_dim 64, float32; {args.pages} pages of {args.page_size}")
    print("| step (tokens, seqs) | temp GiB, all tiles at once | temp GiB, blocks | compile s (all / blocks) |")
    print("|---|---|---|---|")
    for tokens, seqs in ((2048, 256), (256, 256), (512, 1)):
        shape = dict(tokens=tokens, seqs=seqs, pages=args.pages, page_size=args.page_size, heads=9, kv_heads=3,
                     head_dim=64)
        tiled.GATHER_BYTES = 1 << 62
        whole, whole_s = temp_bytes(**shape)
        tiled.GATHER_BYTES = budget
        blocked, blocked_s = temp_bytes(**shape)
        print(f"| {tokens}, {seqs} | {whole / 2**30:.2f} | {blocked / 2**30:.2f} | {whole_s:.1f} / {blocked_s:.1f} |",
              flush=True)
    if args.time:
        for tokens, seqs in ((64, 64), (512, 64)):
            whole, blocked = seconds_both_ways(tokens, seqs, args.pages, args.page_size)
            print(f"step {tokens} tokens / {seqs} sequences at {args.pages * args.page_size} keys each: all tiles "
                  f"{whole * 1e3:.0f} ms, blocks {blocked * 1e3:.0f} ms (blocks / all {blocked / whole:.2f})", flush=True)


if __name__ == "__main__":
    main()

