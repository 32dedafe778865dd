"""Ragged paged attention on an NVIDIA GPU: decode KV bandwidth and prefill FLOP rate of our
kernel against the alternatives, in one run.

Decode: every sequence decodes one token over `context` cached tokens. The floor is the KV
read: batch * context * kv_heads * head_dim * 2 (k and v) * itemsize bytes; achieved
bandwidth = those bytes / median time, beside the device's measured copy bandwidth (a
large device-to-device copy, bytes read + written), the XLA reference and
`jax.experimental.pallas.ops.gpu.paged_attention` (jax's bundled Triton decode kernel).
The Mosaic GPU decode kernel (`mosaic_decode.py`, pages of 64 or 128 tokens only) runs on
the same batch laid out in pages of `--mosaic-page-size` tokens, beside our Triton kernel on
those pages ("mosaic / ours" compares the two at that page size). A dry run skips it: Mosaic
GPU's interpreter cannot run it (see mosaic_decode.py).

Quantized pages (`--kv-dtypes int8 fp8 ...`, `kv_cache_dtype` names): the same decode batch with its
pages quantized (one float32 scale per token and kv head), our kernel checked against the XLA
reference on those pages; GB/s of the bytes it reads (values and scales) and its time against the
bf16 pages. Not part of `gpu_check.sh` (its part limits are spoken for; not yet timed on a GPU).

Prefill: `batch` fresh sequences of `length` tokens (a whole prompt per step), causal;
FLOPs = 2 * 2 * batch * heads * length^2 * head_dim / 2; against
`jax.nn.dot_product_attention(implementation="cudnn")` on the same q, k, v laid out dense.

Every kernel output is checked against the XLA reference first (relative error < 2e-2).

    PYTHONPATH=. python benchmarks/paged_attention.py [--batches 1 8 64 --contexts 512 4096] [--prefill-lengths 2048]
    PYTHONPATH=. python benchmarks/paged_attention.py --dry-run   # tiny shapes, kernels interpreted, any backend
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

from pallas_kernels.paged_attention import QuantizedPages, mosaic_decode, reference, triton_kernel
from pallas_kernels.paged_attention.kv_quant import bytes_per_token, quantize_kv, resolve_kv_cache_dtype
from pallas_kernels.paged_attention.reference import PagedMetadata


def median_seconds(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(num_bytes: int) -> float:
    x = jax.random.normal(jax.random.key(9), (num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    return 2 * num_bytes / median_seconds(copy, x)


def relative_error(got, want) -> float:
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def paged_inputs(batch: int, q_len: int, context: int, args, seed: int, page_size: int | None = None):
    """Random q [B * q_len, H, D], caches and metadata; sequences of `context` tokens whose last q_len are new,
    in pages of `page_size` (default `args.page_size`) tokens."""
    page_size = page_size or args.page_size
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq
    key = jax.random.key(seed)
    dtype = jnp.bfloat16
    k_cache = jax.random.normal(key, (args.kv_heads, num_pages, page_size, args.head_dim), dtype)
    v_cache = jax.random.normal(jax.random.fold_in(key, 1), k_cache.shape, dtype)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch * q_len, args.heads, args.head_dim), dtype)
    rng = np.random.default_rng(seed)
    page_tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
    meta = PagedMetadata(jnp.arange(batch + 1, dtype=jnp.int32) * q_len, jnp.full((batch,), context, jnp.int32),
                         page_tables, jnp.int32(batch))
    return q, k_cache, v_cache, meta


def decode_rows(args, interpret: bool, peak: float) -> list[dict]:
    scale = args.head_dim**-0.5
    records = []
    for batch in args.batches:
        for context in args.contexts:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * 2
            if kv_bytes > args.max_kv_gib * 2**30:
                continue
            q, k_cache, v_cache, meta = paged_inputs(batch, 1, context, args, seed=batch * 7 + context)
            ours = jax.jit(functools.partial(triton_kernel.paged_attention, scale=scale, interpret=interpret))
            xla = jax.jit(functools.partial(reference.paged_attention, scale=scale))
            splits = min(16, meta.page_tables.shape[1])
            theirs = jax.jit(lambda q, k, v, m: jax_pallas.paged_attention(
                q * scale, k, v, m.page_tables, m.kv_lens, k_splits=splits, interpret=interpret))
            expected = xla(q, k_cache, v_cache, meta)
            for name, fn in (("ours", ours), ("jax_pallas", theirs)):
                error = relative_error(fn(q, k_cache, v_cache, meta), expected)
                assert error < 2e-2, f"{name} error {error:.2e} at batch {batch} context {context}"
            row = dict(batch=batch, context=context, kv_bytes=kv_bytes)
            for name, fn in (("ours", ours), ("xla", xla), ("jax_pallas", theirs)):
                row[f"{name}_gb_s"] = kv_bytes / median_seconds(fn, q, k_cache, v_cache, meta, repeats=args.repeats) / 1e9
            row["ours_of_copy"] = row["ours_gb_s"] * 1e9 / peak
            if not interpret:
                row.update(mosaic_row(args, batch, context, kv_bytes))
            for name in args.kv_dtypes:
                row.update(quantized_row(args, name, (q, k_cache, v_cache, meta), batch * context, row["ours_gb_s"],
                                         interpret))
            records.append(row)
            print(json.dumps(row), flush=True)
    return records


def mosaic_row(args, batch: int, context: int, kv_bytes: int) -> dict:
    """GB/s of the Mosaic decode kernel and of our Triton kernel on one batch in `--mosaic-page-size` pages."""
    inputs = paged_inputs(batch, 1, context, args, seed=batch * 7 + context, page_size=args.mosaic_page_size)
    scale = args.head_dim**-0.5
    mosaic = jax.jit(functools.partial(mosaic_decode.paged_attention, scale=scale))
    ours = jax.jit(functools.partial(triton_kernel.paged_attention, scale=scale))
    error = relative_error(mosaic(*inputs), jax.jit(functools.partial(reference.paged_attention, scale=scale))(*inputs))
    assert error < 2e-2, f"mosaic error {error:.2e} at batch {batch} context {context}"
    return {f"{name}_gb_s": kv_bytes / median_seconds(fn, *inputs, repeats=args.repeats) / 1e9
            for name, fn in (("mosaic", mosaic), ("ours_mosaic_pages", ours))}


def quantized_row(args, name: str, inputs, tokens: int, bf16_gb_s: float, interpret: bool) -> dict:
    """GB/s of our kernel on the batch's pages quantized to `name`, and its speed against the bf16 pages."""
    q, k_cache, v_cache, meta = inputs
    dtype = resolve_kv_cache_dtype(name, jnp.bfloat16)
    k_pages, v_pages = (QuantizedPages(*quantize_kv(c, dtype)) for c in (k_cache, v_cache))
    scale = args.head_dim**-0.5
    ours = jax.jit(functools.partial(triton_kernel.paged_attention, scale=scale, interpret=interpret))
    xla = jax.jit(functools.partial(reference.paged_attention, scale=scale))
    error = relative_error(ours(q, k_pages, v_pages, meta), xla(q, k_pages, v_pages, meta))
    assert error < 2e-2, f"{name} pages: error {error:.2e}"
    kv_bytes = 2 * tokens * args.kv_heads * bytes_per_token(args.head_dim, dtype)
    seconds = median_seconds(ours, q, k_pages, v_pages, meta, repeats=args.repeats)
    bf16_seconds = 2 * tokens * args.kv_heads * args.head_dim * 2 / (bf16_gb_s * 1e9)
    return {f"{name}_gb_s": kv_bytes / seconds / 1e9, f"{name}_speedup": bf16_seconds / seconds}


def prefill_rows(args, interpret: bool) -> list[dict]:
    scale = args.head_dim**-0.5
    records = []
    dense_impl = "xla" if interpret else "cudnn"
    for batch in args.prefill_batches:
        for length in args.prefill_lengths:
            q, k_cache, v_cache, meta = paged_inputs(batch, length, length, args, seed=length + batch)
            ours = jax.jit(functools.partial(triton_kernel.paged_attention, scale=scale, interpret=interpret))
            # The same keys and values, dense: [B, T, K, D] in token order.
            def dense_kv(cache, meta=meta):
                pages = cache[:, meta.page_tables]  # [K, B, M, page, D]
                return pages.reshape(args.kv_heads, batch, -1, args.head_dim)[:, :, :length].transpose(1, 2, 0, 3)

            k, v = dense_kv(k_cache), dense_kv(v_cache)
            dense_q = q.reshape(batch, length, args.heads, args.head_dim)
            cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=scale,
                                              implementation=dense_impl))
            want = cudnn(dense_q, k, v).reshape(q.shape)
            error = relative_error(ours(q, k_cache, v_cache, meta), want)
            assert error < 2e-2, f"prefill error {error:.2e} at batch {batch} length {length}"
            flops = 2 * 2 * batch * args.heads * length * length * args.head_dim / 2
            row = dict(batch=batch, length=length, flops=flops)
            row["ours_tflop_s"] = flops / median_seconds(ours, q, k_cache, v_cache, meta, repeats=args.repeats) / 1e12
            row[f"{dense_impl}_tflop_s"] = flops / median_seconds(cudnn, dense_q, k, v, repeats=args.repeats) / 1e12
            records.append(row)
            print(json.dumps(row), flush=True)
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--mosaic-page-size", type=int, default=64, choices=mosaic_decode.PAGE_SIZES)
    parser.add_argument("--max-kv-gib", type=float, default=24.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, the kernels interpreted, any backend")
    parser.add_argument("--kv-dtypes", nargs="*", default=[], help="decode on quantized pages too (int8, fp8, ...)")
    parser.add_argument("--json", help="write every record to this file")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if args.dry_run:
        args.batches, args.contexts, args.prefill_batches, args.prefill_lengths = [2], [64], [1], [32]
        args.heads, args.kv_heads, args.head_dim, args.repeats = 4, 2, 16, 1
    elif interpret:
        raise SystemExit("this benchmark needs an NVIDIA GPU; use --dry-run elsewhere")

    peak = copy_bandwidth(1 << (22 if args.dry_run else 30))
    header = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, copy_gb_s=round(peak / 1e9),
                  heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, page_size=args.page_size,
                  dry_run=args.dry_run)
    print(json.dumps(header))
    decode, prefill = decode_rows(args, interpret, peak), prefill_rows(args, interpret)
    pages = args.mosaic_page_size
    print(f"| batch | context | ours GB/s | XLA ref GB/s | jax pallas GB/s | ours % of copy | ours / jax pallas "
          f"| mosaic GB/s (pages of {pages}) | ours GB/s (pages of {pages}) | mosaic / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in decode:
        mosaic = (f"{r['mosaic_gb_s']:.0f} | {r['ours_mosaic_pages_gb_s']:.0f} "
                  f"| {r['mosaic_gb_s'] / r['ours_mosaic_pages_gb_s']:.2f}") if "mosaic_gb_s" in r else "- | - | -"
        print(f"| {r['batch']} | {r['context']} | {r['ours_gb_s']:.0f} | {r['xla_gb_s']:.0f} | {r['jax_pallas_gb_s']:.0f} "
              f"| {100 * r['ours_of_copy']:.0f}% | {r['ours_gb_s'] / r['jax_pallas_gb_s']:.2f} | {mosaic} |")
    if args.kv_dtypes:
        names = " | ".join(f"{n} GB/s | {n} speed vs bf16" for n in args.kv_dtypes)
        print(f"\n| batch | context | bf16 GB/s | {names} |")
        print("|---|---|---|" + "---|---|" * len(args.kv_dtypes))
        for r in decode:
            cells = " | ".join(f"{r[f'{n}_gb_s']:.0f} | {r[f'{n}_speedup']:.2f}x" for n in args.kv_dtypes)
            print(f"| {r['batch']} | {r['context']} | {r['ours_gb_s']:.0f} | {cells} |")
    dense = "xla" if interpret else "cudnn"
    print(f"\n| prefill batch | length | ours TFLOP/s | {dense} TFLOP/s | ours / {dense} |")
    print("|---|---|---|---|---|")
    for r in prefill:
        print(f"| {r['batch']} | {r['length']} | {r['ours_tflop_s']:.1f} | {r[f'{dense}_tflop_s']:.1f} "
              f"| {r['ours_tflop_s'] / r[f'{dense}_tflop_s']:.2f} |")
    result = dict(header=header, decode=decode, prefill=prefill)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
