"""KV-cache bytes per token of an MLA model: the per-head expanded pages the runner allocates today
against the latent layout (`kv_lora_rank + qk_rope_head_dim` values per token and layer).

The expanded figure is measured from `CausalLM.make_kv_caches` (shapes only, under `eval_shape`;
no weight is allocated) for a DeepSeek-V3-shaped config (transformers' `DeepseekV3Config`
defaults: 61 layers, 128 heads, qk 128 + 64, v 128, kv_lora_rank 512); the latent figure is what a
`LatentKV` pool would hold for the same config.

    PYTHONPATH=. python -m benchmarks.mla_kv_bytes [--dtype bfloat16]
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

PAGES, PAGE_SIZE = 2, 16


def expanded_bytes_per_token(config, dtype: jnp.dtype) -> int:
    """Bytes per cached token over all layers, as the runner allocates them today."""
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    caches = jax.eval_shape(lambda: model.make_kv_caches(PAGES, PAGE_SIZE, dtype))
    total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
    return total // (PAGES * PAGE_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    config = deepseek_v3_config(DeepseekV3Config(), "DeepseekV3ForCausalLM").replace(dtype=args.dtype)
    expanded = expanded_bytes_per_token(config, dtype)
    latent = (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize * config.num_layers
    layers = config.num_layers
    print(f"DeepSeek-V3 shape: {layers} layers, {config.num_heads} heads, cache head_dim {config.head_dim}, "
          f"kv_lora_rank {config.kv_lora_rank} + rope {config.qk_rope_head_dim}, {args.dtype}")
    print("| layout | values per token and layer | bytes per token and layer | bytes per token (all layers) |")
    print("|---|---|---|---|")
    for name, total in (("per-head expanded K and V (today)", expanded), ("latent (LatentKV)", latent)):
        print(f"| {name} | {total // layers // dtype.itemsize} | {total // layers} | {total} |")
    print(f"ratio expanded / latent: {expanded / latent:.1f}x")


if __name__ == "__main__":
    main()
