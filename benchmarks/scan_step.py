"""One serving step, layers scanned (`ModelRunner(scan_layers=True)`) against unrolled, in one process.

Random-weight Llama shapes (`--preset`, as `benchmarks.offline_cpu`), float32, two
`ModelRunner`s on the same weights; a decode step of `--batch` sequences with 80
cached tokens each, and a prefill step of 8 sequences x 64 tokens. The two runners'
steps alternate, `--repeats` times each, and the best time of each is reported (a
shared machine's load moves both alike). Compile time of each step is printed too.

    PYTHONPATH=. python -m benchmarks.scan_step --preset smollm2-135m --batch 16
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import transformers

import model_lib
from benchmarks.offline_cpu import PRESETS
from model_lib.families.llama import llama_config
from model_lib.layers import PagedBatch
from pallas_kernels.paged_attention import PagedMetadata
from serving.engine.runner import ModelRunner, StepInputs

PAGE_SIZE, CACHED, PROMPT, PREFILL_SEQS = 16, 80, 64, 8


def build(preset: str):
    p = PRESETS[preset]
    hf = transformers.LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                                  num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                                  num_key_value_heads=p["kv_heads"], tie_word_embeddings=p["tied"],
                                  max_position_embeddings=2048)
    return model_lib.from_config(llama_config(hf, "LlamaForCausalLM"), seed=0)


def step_inputs(seqs: int, new_tokens: int, kv_len: int, page_bucket: int, vocab: int) -> StepInputs:
    """`seqs` sequences, each with `new_tokens` new tokens ending at `kv_len`, on their own pages."""
    tokens = seqs * new_tokens
    pages_each = -(-kv_len // PAGE_SIZE)
    tables = np.zeros((seqs, page_bucket), np.int32)
    tables[:, :pages_each] = np.arange(seqs * pages_each, dtype=np.int32).reshape(seqs, pages_each)
    meta = PagedMetadata(np.arange(seqs + 1, dtype=np.int32) * new_tokens, np.full(seqs, kv_len, np.int32), tables,
                         np.int32(seqs))
    positions = np.tile(np.arange(kv_len - new_tokens, kv_len, dtype=np.int32), seqs)
    batch = PagedBatch(positions=positions, seq_lens=np.full(tokens, kv_len, np.int32), meta=meta)
    ids = np.random.RandomState(0).randint(3, vocab, tokens).astype(np.int32)
    return StepInputs(ids, np.full(tokens, -1, np.int32), batch, np.arange(1, seqs + 1, dtype=np.int32) * new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-15m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = build(args.preset)
    vocab = model.config.vocab_size
    sizes = dict(num_pages=max(args.batch, PREFILL_SEQS) * 8, page_size=PAGE_SIZE, max_num_seqs=max(args.batch, 8),
                 max_num_batched_tokens=PREFILL_SEQS * PROMPT, max_model_len=8 * PAGE_SIZE)
    runners = {"scanned": ModelRunner(model, **sizes, scan_layers=True), "unrolled": ModelRunner(model, **sizes, scan_layers=False)}
    steps = {f"decode {args.batch}": step_inputs(args.batch, 1, CACHED, 8, vocab),
             f"prefill {PREFILL_SEQS}x{PROMPT}": step_inputs(PREFILL_SEQS, PROMPT, PROMPT, 8, vocab)}
    print(json.dumps(dict(preset=args.preset, jax=jax.__version__, repeats=args.repeats)))
    print("| step | scanned ms | unrolled ms | scanned / unrolled | scanned compile s | unrolled compile s |")
    print("|---|---|---|---|---|---|")
    for name, inputs in steps.items():
        compile_s, best = {}, {k: float("inf") for k in runners}
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.run(inputs).block_until_ready()
            compile_s[key] = time.perf_counter() - start
        for _ in range(args.repeats):
            for key, runner in runners.items():
                start = time.perf_counter()
                runner.run(inputs).block_until_ready()
                best[key] = min(best[key], time.perf_counter() - start)
        print(f"| {name} | {best['scanned'] * 1e3:.1f} | {best['unrolled'] * 1e3:.1f} | "
              f"{best['scanned'] / best['unrolled']:.2f} | {compile_s['scanned']:.1f} | {compile_s['unrolled']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
