"""Where a CPU offline batch spends its time: our step kinds and sampler against transformers' forwards.

Runs `benchmarks.offline_cpu`'s workload (random-weight Llama layout, greedy, 64-token prompts,
32 new tokens) once free-running, then once with every model step and sampler call blocked on
and timed on its own (grouped by step shape: tokens, sequences, pages per sequence). The free
run against the sum of the blocked calls shows what the host adds or hides between steps.
transformers runs the same batch as one prefill forward and 31 cached decode forwards, timed
one by one. The useful FLOPs of each phase come from `offline_cpu.workload_flops`.

    PYTHONPATH=. python -m benchmarks.cpu_step_split --preset llama-15m --batch 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

import serving.engine.engine as engine_module
from benchmarks.offline_cpu import PRESETS, build_model, workload_flops
from serving import LLM, SamplingParams

PROMPT_LEN, OUTPUT_LEN = 64, 32


def blocking(fn, label, records: list):
    """`fn` that waits for its result and records (label(args), seconds)."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        records.append((label(*args), time.perf_counter() - start))
        return out

    return timed


def ours(llm: LLM, prompts: np.ndarray) -> tuple[float, dict[str, list[float]]]:
    """(free-running seconds, seconds of each blocked call by kind)."""
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    # Rolled prompts: the same shapes, no prefix-cache hits between the runs.
    run = lambda shift: llm.generate([{"prompt_token_ids": np.roll(p, shift).tolist()} for p in prompts], params)  # noqa: E731
    run(1)  # compiles every shape
    start = time.perf_counter()
    run(2)
    free = time.perf_counter() - start
    runner, records = llm.engine.runner, []
    sample = engine_module.sample_slots
    runner.run = blocking(runner.run, lambda inputs: f"step {inputs.shape}", records)
    engine_module.sample_slots = blocking(sample, lambda *a: "sampler", records)
    try:
        run(0)
    finally:
        del runner.run
        engine_module.sample_slots = sample
    kinds: dict[str, list[float]] = {}
    for kind, seconds in records:
        kinds.setdefault(kind, []).append(seconds)
    return free, kinds


def transformers_phases(model, prompts: np.ndarray) -> tuple[float, list[float]]:
    """(prefill forward seconds, each decode forward's seconds), greedy with a cache."""
    ids = torch.as_tensor(prompts)
    with torch.no_grad():
        model(ids[:, :8], use_cache=True, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        decode = []
        for _ in range(OUTPUT_LEN - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            decode.append(time.perf_counter() - start)
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-15m")
    parser.add_argument("--batch", type=int, default=16)
    cli = parser.parse_args()
    args = argparse.Namespace(**PRESETS[cli.preset], prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_model(args, Path(tmp))
        llm = LLM(tmp, dtype="float32", max_model_len=PROMPT_LEN + OUTPUT_LEN + 16, max_num_seqs=cli.batch,
                  max_num_batched_tokens=max(512, PROMPT_LEN * 4), page_size=16)
    prompts = np.random.RandomState(0).randint(3, args.vocab, size=(cli.batch, PROMPT_LEN))
    free, kinds = ours(llm, prompts)
    prefill, decode = transformers_phases(hf_model, prompts)
    flops = {k: round(v / 1e9, 2) for k, v in workload_flops(args, cli.batch).items()}
    print(f"{cli.preset}, batch {cli.batch}; useful GFLOP {flops}")
    print(f"jaxllm: free-running {free:.3f} s; blocked calls sum to {sum(map(sum, kinds.values())):.3f} s")
    print("| jaxllm call | calls | total s | median ms |\n|---|---|---|---|")
    for kind, seconds in kinds.items():
        print(f"| {kind} | {len(seconds)} | {sum(seconds):.3f} | {1e3 * np.median(seconds):.1f} |")
    print(f"transformers: prefill forward {prefill:.3f} s; {len(decode)} decode forwards {sum(decode):.3f} s "
          f"(median {1e3 * np.median(decode):.1f} ms)")


if __name__ == "__main__":
    main()
