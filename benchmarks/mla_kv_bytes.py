"""KV-cache bytes per token of an MLA model: what the runner allocates (the latent pages, `kv_lora_rank +
qk_rope_head_dim` values per token and layer, one pool shared by all heads) against the per-head
expanded K and V pages it allocated before (num_heads x head_dim each, head_dim = max(qk, v) head dim).

The latent figure is measured from `CausalLM.make_kv_caches`, the call the runner makes (shapes only,
under `eval_shape`; no weight and no page is allocated), for a DeepSeek-V3-shaped config
(transformers' `DeepseekV3Config` defaults: 61 layers, 128 heads, qk 128 + 64, v 128, kv_lora_rank
512); the per-head figure is that layout's size for the same config. Page dtypes as `--kv-cache-dtype`
names them (int8 / fp8 pages add a float32 scale per token).

    PYTHONPATH=. python -m benchmarks.mla_kv_bytes [--dtype bfloat16] [--kv-cache-dtypes auto int8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import DeepseekV3Config

from model_lib import CausalLM
from model_lib.families.deepseek import deepseek_v3_config
from pallas_kernels.paged_attention.kv_quant import bytes_per_token, resolve_kv_cache_dtype

PAGES, PAGE_SIZE = 2, 16


def allocated_bytes_per_token(config, dtype: jnp.dtype) -> int:
    """Bytes per cached token over all layers, as `make_kv_caches` (the runner) allocates them."""
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    caches = jax.eval_shape(lambda: model.make_kv_caches(PAGES, PAGE_SIZE, dtype))
    total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
    return total // (PAGES * PAGE_SIZE)


def per_head_bytes_per_token(config, dtype: jnp.dtype) -> int:
    """Bytes per token over all layers of per-head K and V pages (num_heads kv heads of head_dim)."""
    return 2 * config.num_heads * bytes_per_token(config.head_dim, dtype) * config.num_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["auto", "int8"])
    args = parser.parse_args()
    config = deepseek_v3_config(DeepseekV3Config(), "DeepseekV3ForCausalLM").replace(dtype=args.dtype)
    layers = config.num_layers
    print(f"DeepSeek-V3 shape: {layers} layers, {config.num_heads} heads, per-head cache head_dim {config.head_dim}, "
          f"kv_lora_rank {config.kv_lora_rank} + rope {config.qk_rope_head_dim}, model dtype {args.dtype}")
    print("| kv cache dtype | layout | values per token and layer | bytes per token and layer | "
          "bytes per token (all layers) |")
    print("|---|---|---|---|---|")
    for name in args.kv_cache_dtypes:
        dtype = resolve_kv_cache_dtype(name, config.dtype)
        latent = allocated_bytes_per_token(config, dtype)
        per_head = per_head_bytes_per_token(config, dtype)
        values = {"latent": config.kv_lora_rank + config.qk_rope_head_dim,
                  "per-head": 2 * config.num_heads * config.head_dim}
        for layout, total in (("per-head K and V (before)", per_head), ("latent (runner's allocation)", latent)):
            print(f"| {name} ({dtype.name}) | {layout} | {values[layout.split()[0]]} | {total // layers} | {total} |")
        print(f"| {name} ({dtype.name}) | ratio per-head / latent | | {per_head / latent:.1f}x | |")


if __name__ == "__main__":
    main()
