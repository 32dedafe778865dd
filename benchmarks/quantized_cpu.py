"""Weight formats of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on CPU: bytes per parameter,
greedy decode tokens/s and greedy agreement with the bf16 model over 256 tokens.

Rows: the GGUF's weights dequantized to bfloat16 (the baseline) and to float32, and weight-only
int8 (`quantization="int8"`, from the float32 weights; float32 compute). Every row starts from
the same Q4_1 file, so "agreement" measures what each format adds on top of Q4_1. Bytes per
parameter count what the loaded model holds (`param_bytes`; the GGUF's blocks are not kept
quantized yet), next to the file's own. Decode: one chat prompt, 256 tokens, `ignore_eos`,
after a short warm-up generation of the same shapes (compilation excluded).

    python -m benchmarks.quantized_cpu [--tokens 256]   # from the repository root
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from model_lib.lora import param_bytes
from serving import LLM, SamplingParams
from serving.default_model import default_model_path

ROWS = {"bf16": dict(dtype="bfloat16"), "gguf-q4_1-f32": dict(dtype="float32"), "int8": dict(dtype="float32", quantization="int8")}
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def bytes_per_param(path, dtype: str, quantization: str | None) -> float:
    """Bytes the loaded model holds per parameter of the float model (int8 scales count as overhead)."""
    from flax import nnx

    import model_lib

    model = model_lib.from_pretrained(path, dtype=dtype, quantization=quantization)
    _, state = nnx.split(model)
    count = sum(
        int(np.prod(v.get_value().shape))
        for p, v in nnx.to_flat_state(state)
        if not isinstance(v, nnx.RngState) and p[-1] != "scale"
    )
    return param_bytes(model) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    path = default_model_path()
    results = {}
    for name, options in ROWS.items():
        start = time.perf_counter()
        llm = LLM(path, max_model_len=512, max_num_seqs=1, **options)
        load = time.perf_counter() - start
        ids = llm.get_tokenizer().apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        # Warm-up: the prefill and the batch-1 decode step compile (decode shapes do not grow with length).
        llm.generate({"prompt_token_ids": list(ids)}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        start = time.perf_counter()
        tokens = llm.generate({"prompt_token_ids": list(ids)}, params)[0].outputs[0].token_ids
        seconds = time.perf_counter() - start
        del llm
        per_param = bytes_per_param(path, options["dtype"], options.get("quantization"))
        results[name] = dict(bytes_per_param=per_param, tok_s=len(tokens) / seconds, tokens=tokens, load=load)
        base = results[next(iter(results))]["tokens"]
        match = np.mean([a == b for a, b in zip(tokens, base)])
        print(f"{name}: load {load:.1f} s, {len(tokens) / seconds:.1f} tok/s, {per_param:.2f} B/param, match {match:.3f}", flush=True)
    base = results["bf16"]["tokens"]
    file_bytes = path.stat().st_size
    print(f"\nfile: {path.name}, {file_bytes / 2**20:.1f} MiB\n")
    print("| format | bytes / param (loaded) | decode tok/s | greedy match vs bf16 | first divergence |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        match = np.mean([a == b for a, b in zip(r["tokens"], base)])
        first = next((i for i, (a, b) in enumerate(zip(r["tokens"], base)) if a != b), None)
        print(f"| {name} | {r['bytes_per_param']:.2f} | {r['tok_s']:.1f} | {match:.3f} | {first if first is not None else '-'} |")


if __name__ == "__main__":
    main()
