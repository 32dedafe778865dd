"""Compile time of one serving step against depth: layers unrolled vs scanned (`model_lib.layer_scan`).

Random-weight SmolLM2-135M-shaped model (576 hidden, 9/3 heads, 1536 intermediate,
49152 vocab, tied) at several depths; one prefill step shape (64 tokens, 1 sequence,
8 pages of 16). Times `jax.jit(step).lower(...).compile()` on this machine's CPU.

    PYTHONPATH=. python -m benchmarks.step_compile --depths 2 10 30
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

import model_lib
from model_lib.families.llama import llama_config
from model_lib.layer_scan import scanned_view
from model_lib.layers import PagedBatch
from pallas_kernels.paged_attention import PagedMetadata

NUM_TOKENS, PAGE_SIZE, PAGES_PER_SEQ = 64, 16, 8


def smollm2_shape(depth: int):
    hf = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=depth,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                  max_position_embeddings=2048)
    return model_lib.from_config(llama_config(hf, "LlamaForCausalLM"))


def compile_seconds(model) -> float:
    caches = model.make_kv_caches(PAGES_PER_SEQ, PAGE_SIZE, jnp.float32)
    meta = PagedMetadata(np.array([0, NUM_TOKENS], np.int32), np.array([NUM_TOKENS], np.int32),
                         np.arange(PAGES_PER_SEQ, dtype=np.int32)[None], np.int32(1))
    positions = np.arange(NUM_TOKENS, dtype=np.int32)
    batch = PagedBatch(positions=positions, seq_lens=np.full(NUM_TOKENS, NUM_TOKENS, np.int32), meta=meta)
    ids, last = np.zeros(NUM_TOKENS, np.int32), np.array([NUM_TOKENS - 1], np.int32)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, *args: nnx.merge(graphdef, state).forward(*args), donate_argnums=3)
    start = time.perf_counter()
    step.lower(state, ids, batch, caches, last).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 10, 30])
    args = parser.parse_args()
    print(json.dumps(dict(jax=jax.__version__, step=f"{NUM_TOKENS} tokens, 1 sequence, {PAGES_PER_SEQ} pages of {PAGE_SIZE}")))
    print("| layers | unrolled compile s | scanned compile s | ratio |")
    print("|---|---|---|---|")
    for depth in args.depths:
        model = smollm2_shape(depth)
        unrolled = compile_seconds(model)
        scanned = compile_seconds(scanned_view(model))
        print(f"| {depth} | {unrolled:.1f} | {scanned:.1f} | {unrolled / scanned:.1f} |", flush=True)


if __name__ == "__main__":
    main()
