"""MLA prefill step time: the expanded form against the absorbed one, one MLA layer, same process.

One sequence prefills a chunk of `chunk` new tokens after `prefix` cached tokens (latent pages
of 16 tokens) through one `MLAttention` layer (`model_lib/layers/mla.py`) at a small DeepSeek-like
shape (default 16 heads, kv_lora_rank 512 + rope 64, qk nope 128, v 128, hidden 1024), jitted,
with `PagedBatch.expanded_from` None (absorbed) or 0 (expanded). The two forms run alternately,
`repeats` times each after a warm-up, and both outputs are checked equal first. Prints a markdown
row per (prefix, chunk): median ms of each form and absorbed / expanded.

    PYTHONPATH=. python -m benchmarks.mla_prefill_cpu [--chunks 32 128 512] [--prefixes 0 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import DeepseekV3Config

from model_lib.families.deepseek import deepseek_v3_config
from model_lib.layers import PagedBatch
from model_lib.layers.mla import MLAttention
from pallas_kernels.paged_attention import PagedMetadata
from pallas_kernels.paged_attention.latent_expanded import expanded_crossover

PAGE_SIZE = 16


@nnx.jit
def layer_step(layer, x, batch, cache):
    return layer(x, batch, cache)


def step_inputs(prefix: int, chunk: int, hidden: int, width: int, dtype, seed: int):
    """Hidden states of the chunk, its one-sequence paged batch and random latent pages for the prefix."""
    kv_len = prefix + chunk
    num_pages = -(-kv_len // PAGE_SIZE)
    rng = np.random.default_rng(seed)
    cache = jnp.asarray(rng.standard_normal((1, num_pages, PAGE_SIZE, width)), dtype)
    meta = PagedMetadata(jnp.array([0, chunk], jnp.int32), jnp.array([kv_len], jnp.int32),
                         jnp.asarray(rng.permutation(num_pages)[None], jnp.int32), jnp.int32(1))
    batch = PagedBatch(positions=jnp.arange(prefix, kv_len, dtype=jnp.int32), seq_lens=jnp.full(chunk, kv_len, jnp.int32),
                       meta=meta)
    x = jnp.asarray(rng.standard_normal((chunk, hidden)), dtype)
    return x, batch, cache


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--kv-lora-rank", type=int, default=512)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--nope-dim", type=int, default=128)
    parser.add_argument("--v-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    hf = DeepseekV3Config(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          kv_lora_rank=args.kv_lora_rank, q_lora_rank=None, qk_rope_head_dim=args.rope_dim,
                          qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim, num_hidden_layers=1,
                          first_k_dense_replace=1, intermediate_size=64, vocab_size=64)
    config = deepseek_v3_config(hf, "DeepseekV3ForCausalLM").replace(dtype=args.dtype)
    layer = MLAttention(config, 0, rngs=nnx.Rngs(0))
    width, dtype = args.kv_lora_rank + args.rope_dim, jnp.dtype(args.dtype)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {args.heads} heads, latent {args.kv_lora_rank}"
          f"+{args.rope_dim}, qk nope {args.nope_dim}, v {args.v_dim}, {args.dtype}; FLOP crossover "
          f"{expanded_crossover(args.kv_lora_rank, args.nope_dim, args.v_dim)} new tokens")
    print("| prefix | chunk | absorbed ms | expanded ms | absorbed / expanded |")
    print("|---|---|---|---|---|")
    rows = []
    for prefix in args.prefixes:
        for chunk in args.chunks:
            x, batch, cache = step_inputs(prefix, chunk, args.hidden, width, dtype, seed=prefix + chunk)
            forms = {"absorbed": batch, "expanded": batch.replace(expanded_from=jnp.int32(0))}
            outs = {name: layer_step(layer, x, b, cache)[0] for name, b in forms.items()}  # compile, warm up
            scale = float(jnp.abs(outs["absorbed"]).max())
            error = float(jnp.abs(outs["absorbed"] - outs["expanded"]).max()) / scale
            assert error < (1e-4 if args.dtype == "float32" else 3e-2), f"forms differ by {error:.2e}"
            times = {name: [] for name in forms}
            for _ in range(args.repeats):
                for name, b in forms.items():  # alternating, so load changes hit both alike
                    start = time.perf_counter()
                    jax.block_until_ready(layer_step(layer, x, b, cache))
                    times[name].append(time.perf_counter() - start)
            absorbed, expanded = (statistics.median(times[n]) * 1e3 for n in ("absorbed", "expanded"))
            rows.append(dict(prefix=prefix, chunk=chunk, absorbed_ms=absorbed, expanded_ms=expanded))
            print(f"| {prefix} | {chunk} | {absorbed:.1f} | {expanded:.1f} | {absorbed / expanded:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
