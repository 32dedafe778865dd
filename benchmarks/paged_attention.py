"""Decode KV bandwidth of ragged paged attention: our kernel vs the XLA reference vs
`jax.experimental.pallas.ops.gpu.paged_attention`, in one run (NVIDIA GPU).

Every sequence decodes one token over `context` cached tokens. The floor is the
KV read: batch * context * kv_heads * head_dim * 2 (k and v) * itemsize bytes;
achieved bandwidth = those bytes / median time. The device's measured copy
bandwidth (a large device-to-device copy) is printed beside it.

    PYTHONPATH=. python benchmarks/paged_attention.py [--batches 1 8 64 256 --contexts 512 4096 32768]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import paged_attention as jax_pallas

from pallas_kernels.paged_attention import reference, triton_kernel
from pallas_kernels.paged_attention.reference import PagedMetadata


def median_seconds(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)
    return 2 * num_bytes / median_seconds(copy, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-kv-gib", type=float, default=24.0)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("this benchmark needs an NVIDIA GPU")

    dtype = jnp.bfloat16
    peak = copy_bandwidth()
    print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, copy_gb_s=round(peak / 1e9))))
    print("| batch | context | ours GB/s | XLA ref GB/s | jax pallas GB/s | ours % of copy |")
    print("|---|---|---|---|---|---|")
    scale = args.head_dim**-0.5
    for batch in args.batches:
        for context in args.contexts:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * 2
            if kv_bytes > args.max_kv_gib * 2**30:
                continue
            pages_per_seq = context // args.page_size
            num_pages = batch * pages_per_seq
            rng = np.random.default_rng(batch * 7 + context)
            key = jax.random.key(0)
            k_cache = jax.random.normal(key, (args.kv_heads, num_pages, args.page_size, args.head_dim), dtype)
            v_cache = jax.random.normal(jax.random.fold_in(key, 1), k_cache.shape, dtype)
            q = jax.random.normal(jax.random.fold_in(key, 2), (batch, args.heads, args.head_dim), dtype)
            page_tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
            kv_lens = jnp.full((batch,), context, jnp.int32)
            cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
            meta = PagedMetadata(cu_q_lens, kv_lens, page_tables, jnp.int32(batch))

            ours = functools.partial(triton_kernel.paged_attention, meta=meta, scale=scale)
            xla = jax.jit(functools.partial(reference.paged_attention, meta=meta, scale=scale))
            splits = min(16, pages_per_seq)
            theirs = jax.jit(lambda q, k, v: jax_pallas.paged_attention(q * scale, k, v, page_tables, kv_lens, k_splits=splits))
            expected = xla(q, k_cache, v_cache)
            got = ours(q, k_cache, v_cache)
            error = float(jnp.linalg.norm((got - expected).astype(jnp.float32)) / jnp.linalg.norm(expected.astype(jnp.float32)))
            assert error < 2e-2, f"kernel error {error} at batch {batch} context {context}"
            row = [kv_bytes / median_seconds(f, q, k_cache, v_cache) / 1e9 for f in (ours, xla, theirs)]
            print(f"| {batch} | {context} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {100 * row[0] * 1e9 / peak:.0f}% |")


if __name__ == "__main__":
    main()
