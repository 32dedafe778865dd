"""Embedding throughput of the pooling engine on the CPU: batched (the default) against one request
per step, in the same process on the same random BERT.

    python -m benchmarks.pooling_cpu --num-inputs 256 --hidden 256 --layers 4

Builds a random `BertModel` with transformers (nothing is downloaded), saves it to a temporary
folder, embeds `--num-inputs` token-id inputs of random lengths (8 to `--max-len`) with
`LLM.embed`, and prints inputs/s and tokens/s for each `max_num_seqs`. Each
setting runs once to compile its shapes, then is timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-inputs", type=int, default=256)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqs", default="1,64", help="max_num_seqs settings, the first is the baseline")
    args = p.parse_args()

    import torch
    import transformers

    from serving import LLM

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden)
    transformers.BertModel(config).save_pretrained(folder)
    rng = np.random.RandomState(0)
    inputs = [{"prompt_token_ids": rng.randint(1000, 30000, n).tolist()}
              for n in rng.randint(8, args.max_len + 1, args.num_inputs)]
    tokens = sum(len(i["prompt_token_ids"]) for i in inputs)
    print(f"{args.num_inputs} inputs, {tokens} tokens; BERT hidden {args.hidden}, {args.layers} layers")
    baseline = None
    for seqs in map(int, args.seqs.split(",")):
        llm = LLM(folder, max_num_seqs=seqs, max_num_batched_tokens=max(2048, seqs * 8))
        llm.embed(inputs)  # compiles every shape this workload meets
        start = time.perf_counter()
        llm.embed(inputs)
        seconds = time.perf_counter() - start
        rate = args.num_inputs / seconds
        baseline = baseline or rate
        print(f"max_num_seqs={seqs}: {rate:.1f} inputs/s, {tokens / seconds:.0f} tokens/s ({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
