"""MLA decode attention on an NVIDIA GPU: latent pages (absorbed form) against per-head K/V pages.

Every sequence decodes one token over `context` cached tokens at DeepSeek-V3's attention shape
(default: the 16 query heads of one tp-8 shard, kv_lora_rank 512 + rope 64, qk 128 + 64, v 128):
- latent: our Triton kernel over one latent pool `[1, P, B, 576]` (`value_dim=512`), and the XLA
  reference on the same pages; bytes read = batch * context * 576 * 2;
- per-head: our kernel over K and V pages of `heads` kv heads of head_dim 192 (the layout MLA served
  from before the latent cache; V padded to 192 as it was), bytes read = batch * context * heads * 192 * 2 * 2.
Each kernel output is checked against the XLA reference first (relative error < 2e-2); the table gives
GB/s of the bytes each layout reads and the time ratio per-head / latent.

    PYTHONPATH=. python -m benchmarks.mla_attention [--batches 1 8 64 --contexts 4096 32768]
    PYTHONPATH=. python -m benchmarks.mla_attention --dry-run   # tiny shapes, kernels interpreted, any backend
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.paged_attention import median_seconds, relative_error
from pallas_kernels.paged_attention import reference, triton_kernel
from pallas_kernels.paged_attention.reference import PagedMetadata


def decode_inputs(batch: int, context: int, heads: int, kv_heads: int, dim: int, page_size: int, seed: int):
    """Random decode queries `[batch, heads, dim]`, one pool `[kv_heads, P, page_size, dim]` and its metadata."""
    pages_per_seq = -(-context // page_size)
    key = jax.random.key(seed)
    cache = jax.random.normal(key, (kv_heads, batch * pages_per_seq, page_size, dim), jnp.bfloat16)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, heads, dim), jnp.bfloat16)
    tables = np.random.default_rng(seed).permutation(batch * pages_per_seq).reshape(batch, pages_per_seq)
    meta = PagedMetadata(jnp.arange(batch + 1, dtype=jnp.int32), jnp.full((batch,), context, jnp.int32),
                         jnp.asarray(tables, jnp.int32), jnp.int32(batch))
    return q, cache, meta


def decode_row(args, batch: int, context: int, interpret: bool) -> dict:
    latent_dim, qk_dim = args.kv_lora_rank + args.rope_dim, args.nope_dim + args.rope_dim
    scale = qk_dim**-0.5
    q, latent, meta = decode_inputs(batch, context, args.heads, 1, latent_dim, args.page_size, seed=batch + context)
    options = dict(scale=scale, value_dim=args.kv_lora_rank)
    ours = jax.jit(lambda q, c, m: triton_kernel.paged_attention(q, c, None, m, **options, interpret=interpret))
    xla = jax.jit(lambda q, c, m: reference.paged_attention(q, c, None, m, **options))
    error = relative_error(ours(q, latent, meta), xla(q, latent, meta))
    assert error < 2e-2, f"latent kernel error {error:.2e} at batch {batch} context {context}"

    q_heads, k_cache, meta_heads = decode_inputs(batch, context, args.heads, args.heads, qk_dim, args.page_size,
                                                 seed=batch + context + 1)
    v_cache = jax.random.normal(jax.random.key(3), k_cache.shape, jnp.bfloat16)
    per_head = jax.jit(functools.partial(triton_kernel.paged_attention, scale=scale, interpret=interpret))
    error = relative_error(per_head(q_heads, k_cache, v_cache, meta_heads),
                           reference.paged_attention(q_heads, k_cache, v_cache, meta_heads, scale=scale))
    assert error < 2e-2, f"per-head kernel error {error:.2e} at batch {batch} context {context}"

    latent_bytes = batch * context * latent_dim * 2
    per_head_bytes = 2 * batch * context * args.heads * qk_dim * 2
    t_latent = median_seconds(ours, q, latent, meta, repeats=args.repeats)
    t_xla = median_seconds(xla, q, latent, meta, repeats=args.repeats)
    t_heads = median_seconds(per_head, q_heads, k_cache, v_cache, meta_heads, repeats=args.repeats)
    return dict(batch=batch, context=context, latent_bytes=latent_bytes, per_head_bytes=per_head_bytes,
                latent_us=t_latent * 1e6, latent_gb_s=latent_bytes / t_latent / 1e9,
                latent_xla_gb_s=latent_bytes / t_xla / 1e9, per_head_us=t_heads * 1e6,
                per_head_gb_s=per_head_bytes / t_heads / 1e9, per_head_over_latent=t_heads / t_latent)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--heads", type=int, default=16, help="query heads of one tensor shard (128 / tp 8)")
    parser.add_argument("--kv-lora-rank", type=int, default=512)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--nope-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-kv-gib", type=float, default=24.0, help="skip rows whose per-head pages exceed this")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, the kernels interpreted, any backend")
    parser.add_argument("--json", help="write every record to this file")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if args.dry_run:
        args.batches, args.contexts, args.heads, args.page_size, args.repeats = [2], [64], 4, 16, 1
        args.kv_lora_rank, args.rope_dim, args.nope_dim = 32, 16, 16
    elif interpret:
        raise SystemExit("this benchmark needs an NVIDIA GPU; use --dry-run elsewhere")
    header = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, heads=args.heads,
                  latent=f"{args.kv_lora_rank}+{args.rope_dim}", page_size=args.page_size, dry_run=args.dry_run)
    print(json.dumps(header))
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            per_head_bytes = 2 * batch * context * args.heads * (args.nope_dim + args.rope_dim) * 2
            if per_head_bytes > args.max_kv_gib * 2**30:
                continue
            rows.append(decode_row(args, batch, context, interpret))
            print(json.dumps(rows[-1]), flush=True)
    print("| batch | context | latent us | latent GB/s | latent XLA ref GB/s | per-head us | per-head GB/s "
          "| per-head / latent time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['latent_us']:.0f} | {r['latent_gb_s']:.0f} "
              f"| {r['latent_xla_gb_s']:.0f} | {r['per_head_us']:.0f} | {r['per_head_gb_s']:.0f} "
              f"| {r['per_head_over_latent']:.2f} |")
    result = dict(header=header, decode=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
