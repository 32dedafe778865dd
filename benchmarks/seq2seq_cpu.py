"""Encoder-decoder generation on the CPU: the engine batching many requests (each encoded once into its
slot's cross K/V) against one request per step and against transformers' batched `generate`, in the same
process on the same random BART.

    python -m benchmarks.seq2seq_cpu --num-requests 32 --hidden 256 --layers 4 --max-tokens 32

Builds a random `BartForConditionalGeneration` with transformers (nothing is downloaded), generates
`--max-tokens` greedy tokens (EOS ignored) for `--num-requests` sources of random lengths (16 to
`--max-len`) with `LLM.generate`, and prints generated tokens/s for each `max_num_seqs`; then transformers'
`generate` on the same sources, padded into one batch. Each engine setting runs once to compile its shapes,
then is timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seqs", default="1,32", help="max_num_seqs settings, the first is the baseline")
    args = p.parse_args()

    import torch
    import transformers

    from serving import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=8192, d_model=args.hidden, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.hidden // 64, decoder_attention_heads=args.hidden // 64,
        encoder_ffn_dim=4 * args.hidden, decoder_ffn_dim=4 * args.hidden, max_position_embeddings=128,
        forced_eos_token_id=None)
    reference = transformers.BartForConditionalGeneration(config).eval()
    reference.save_pretrained(folder)
    rng = np.random.RandomState(0)
    sources = [rng.randint(3, 8192, n).tolist() for n in rng.randint(16, args.max_len + 1, args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    generated = args.num_requests * args.max_tokens
    print(f"{args.num_requests} requests, {sum(map(len, sources))} source tokens, {generated} generated; "
          f"BART hidden {args.hidden}, {args.layers}+{args.layers} layers")
    baseline = None
    for seqs in map(int, args.seqs.split(",")):
        llm = LLM(folder, max_num_seqs=seqs, max_num_batched_tokens=max(256, seqs))
        prompts = [{"prompt_token_ids": s} for s in sources]
        llm.generate(prompts, params)  # compiles every shape this workload meets
        start = time.perf_counter()
        llm.generate(prompts, params)
        rate = generated / (time.perf_counter() - start)
        baseline = baseline or rate
        print(f"engine max_num_seqs={seqs}: {rate:.1f} generated tokens/s ({rate / baseline:.2f}x)")
    ids = np.full((len(sources), max(map(len, sources))), config.pad_token_id)
    mask = np.zeros_like(ids)
    for row, source in enumerate(sources):
        ids[row, : len(source)], mask[row, : len(source)] = source, 1
    with torch.no_grad():
        start = time.perf_counter()
        reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                           num_beams=1, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)
        rate = generated / (time.perf_counter() - start)
    print(f"transformers generate (one padded batch, torch CPU): {rate:.1f} generated tokens/s "
          f"({rate / baseline:.2f}x)")


if __name__ == "__main__":
    main()
