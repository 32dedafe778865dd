"""Many LoRA adapters in one batch on CPU: decode tokens/s of a 4-sequence batch with 0, 1 and 4 adapters,
against the base model without LoRA, every row in one process (the default model, SmolLM2-135M-Instruct,
in float32).

Rows: `base` (an engine without LoRA), and an engine with `enable_lora` (4 slots, rank 16, stacks on every
linear layer but the head) running the same batch with no adapter (`lora-0`), one adapter for all four
sequences (`lora-1`) and a different adapter per sequence (`lora-4`). Adapters: random rank-16 PEFT
adapters on every linear layer (`all-linear`), B drawn at 0.02 so the text stays plausible. Decode rate:
4 x (N - 1) tokens over the time of an N-token generation minus that of a 1-token one (the prefill), best
of `--rounds` interleaved rounds, after a warm-up of the same shapes (prefix caching off, so every round
prefills alike).

    python -m benchmarks.multi_lora [--tokens 64] [--rounds 2]   # from the repository root
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import model_lib
from model_lib.lora import LoraConfig, apply_lora, linear_layers, save_peft_adapter
from serving import LLM, LoRARequest, SamplingParams
from serving.default_model import default_model_path

BATCH = 4
RANK = 16
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def write_adapters(model_path: Path, folder: Path, count: int) -> list[LoRARequest]:
    model = model_lib.from_pretrained(model_path, dtype="float32")
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    requests = []
    for i in range(count):
        apply_lora(model, config, seed=i)
        rng = np.random.RandomState(i)
        for layer in linear_layers(model).values():
            if layer.lora_b is not None:
                layer.lora_b.set_value(jnp.asarray(rng.randn(*layer.lora_b.shape) * 0.02, jnp.float32))
        save_peft_adapter(model, config, folder / f"adapter{i}", str(model_path))
        requests.append(LoRARequest(f"adapter{i}", i + 1, str(folder / f"adapter{i}")))
    return requests


def timed(llm: LLM, prompt: list[int], loras: list[LoRARequest | None], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": prompt}] * BATCH, params, lora_request=loras)
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    gguf = default_model_path()
    scratch = tempfile.TemporaryDirectory()
    adapters = write_adapters(gguf, Path(scratch.name), BATCH)
    options = dict(dtype="float32", max_model_len=256, max_num_seqs=BATCH, enable_prefix_caching=False)
    base = LLM(gguf, **options)
    lora = LLM(gguf, enable_lora=True, max_loras=BATCH, max_lora_rank=RANK, **options)
    ids = base.get_tokenizer().apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    prompt = list(ids)
    rows = {
        "base": (base, [None] * BATCH),
        "lora-0": (lora, [None] * BATCH),
        "lora-1": (lora, [adapters[0]] * BATCH),
        "lora-4": (lora, adapters),
    }
    for llm, loras in rows.values():  # compile the prefill and decode shapes; load the adapters
        timed(llm, prompt, loras, 2)
    best = {name: 0.0 for name in rows}
    for _ in range(args.rounds):
        for name, (llm, loras) in rows.items():
            decode = timed(llm, prompt, loras, args.tokens) - timed(llm, prompt, loras, 1)
            best[name] = max(best[name], BATCH * (args.tokens - 1) / decode)
            print(f"{name}: {best[name]:.1f} tok/s", flush=True)
    print(f"\nmodel: {gguf.name} in float32, batch {BATCH}, prompt {len(prompt)} tokens, {args.tokens} tokens, "
          f"{len(lora.engine.lora.paths)} layers with adapter stacks of rank {RANK} "
          f"({lora.engine.lora.stack_bytes / 2**20:.1f} MiB)\n")
    print("| row | adapters in the batch | decode tok/s | vs base |")
    print("|---|---|---|---|")
    for name, (_, loras) in rows.items():
        used = len({r.lora_name for r in loras if r is not None})
        print(f"| {name} | {used} | {best[name]:.1f} | {best[name] / best['base']:.2f} |")


if __name__ == "__main__":
    main()
