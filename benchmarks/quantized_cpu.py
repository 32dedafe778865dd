"""Weight formats of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on CPU: bytes per parameter,
greedy decode tokens/s and greedy agreement with the bf16 model over 256 tokens.

Rows: the GGUF's weights dequantized to bfloat16 (the baseline) and to float32; weight-only int8
and int4 (`quantization="int8"` / `"int4"`: group 128, or 64 where 128 does not divide the input
width, as SmolLM2's 576; float32 compute); and FP8: a checkpoint in llm-compressor's
`float-quantized` layout (float8_e4m3fn weights, one float32 scale per output channel) written
at run time from the float32 weights, loaded as a pre-quantized checkpoint: dequantized to float32
(`fp8-channel`, the CPU default) or kept in float8_e4m3fn with W8A8 compute (`fp8-w8a8`:
`quantization="fp8"`, activations quantized per token; the jnp reference on a CPU, FP8 GEMMs on a
GPU); `fp8-dynamic` quantizes the float32 weights to FP8 per channel at load (`quantization="fp8"`
on the GGUF). On a CPU the FP8 rows say nothing about speed (the reference upcasts): bytes per
parameter and agreement are their figures. `gguf-q4_1` keeps the GGUF's own Q4_1 blocks quantized
(`quantization="gguf"`, float32 compute). Every row starts from the same Q4_1 file, so "agreement" measures
what each format adds on top of Q4_1; agreement with the float32 row is printed too. Bytes per
parameter count what the loaded model holds (`param_bytes`) over the float model's parameter count.
Decode: one chat prompt, 256 tokens, `ignore_eos`, after a short warm-up generation of the same
shapes (compilation excluded).

    python -m benchmarks.quantized_cpu [--tokens 256] [--formats bf16,gguf-q4_1]   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from model_lib.lora import param_bytes
from serving import LLM, SamplingParams
from serving.default_model import default_model_path

ROWS = {
    "bf16": dict(dtype="bfloat16"),
    "gguf-q4_1-f32": dict(dtype="float32"),
    "int8": dict(dtype="float32", quantization="int8"),
    "int4": dict(dtype="float32", quantization="int4"),
    "fp8-channel": dict(dtype="float32", fp8=True),
    "fp8-w8a8": dict(dtype="float32", fp8=True, quantization="fp8"),
    "fp8-dynamic": dict(dtype="float32", quantization="fp8"),
    "gguf-q4_1": dict(dtype="float32", quantization="gguf"),
}
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
FP8_MAX = 448.0  # largest float8_e4m3fn value


def write_fp8_checkpoint(gguf: Path, folder: Path) -> Path:
    """An FP8 per-channel checkpoint (llm-compressor `float-quantized` layout) of the GGUF's float32 weights."""
    import ml_dtypes
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    import model_lib

    model_lib.save_pretrained(model_lib.from_pretrained(gguf, dtype="float32"), folder)
    tensors = {}
    for name, array in load_file(str(folder / "model.safetensors")).items():
        if name.endswith("_proj.weight"):
            scale = (np.abs(array).max(axis=1, keepdims=True) / FP8_MAX).astype(np.float32)
            values = (array / np.where(scale == 0, 1, scale)).astype(ml_dtypes.float8_e4m3fn)
            tensors[name] = torch.from_numpy(values.view(np.uint8)).view(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale")] = torch.from_numpy(scale)
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    weights = dict(num_bits=8, type="float", symmetric=True, strategy="channel")
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "ignore": ["lm_head"], "config_groups": {"group_0": {
                                         "targets": ["Linear"], "weights": weights, "format": "float-quantized"}}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def float_param_count(path: Path) -> int:
    """Parameters of the float model (quantized formats' scales and zero points are overhead)."""
    from flax import nnx

    import model_lib

    _, state = nnx.split(model_lib.from_pretrained(path, dtype="bfloat16"))
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param))


def match(tokens: list[int], base: list[int]) -> tuple[float, int | None]:
    first = next((i for i, (a, b) in enumerate(zip(tokens, base)) if a != b), None)
    return float(np.mean([a == b for a, b in zip(tokens, base)])), first


def parse_args(rows) -> argparse.Namespace:
    """`--tokens` to generate and `--formats` (alias `--rows`), a comma-separated subset of `rows`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--formats", "--rows", dest="formats", default=",".join(rows),
                        help=f"comma-separated subset of {', '.join(rows)} (the first is the baseline: include it)")
    return parser.parse_args()


def greedy_decode(llm: LLM, max_tokens: int) -> tuple[list[int], float]:
    """PROMPT's greedy tokens (`ignore_eos`) and their rate in tokens/s, after a short warm-up generation of
    the same shapes (the prefill and batch-1 decode steps compile; decode shapes do not grow with length)."""
    ids = llm.get_tokenizer().apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    llm.generate({"prompt_token_ids": list(ids)}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    start = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = llm.generate({"prompt_token_ids": list(ids)}, params)[0].outputs[0].token_ids
    return tokens, len(tokens) / (time.perf_counter() - start)


def main() -> None:
    import model_lib

    args = parse_args(ROWS)
    gguf = default_model_path()
    count = float_param_count(gguf)
    scratch = tempfile.TemporaryDirectory()
    results = {}
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in ROWS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(ROWS)}")
    for name in formats:
        options = dict(ROWS[name])
        path = write_fp8_checkpoint(gguf, Path(scratch.name) / "fp8") if options.pop("fp8", False) else gguf
        start = time.perf_counter()
        llm = LLM(path, tokenizer=gguf, max_model_len=512, max_num_seqs=1, **options)
        load = time.perf_counter() - start
        tokens, tok_s = greedy_decode(llm, args.tokens)
        del llm
        per_param = param_bytes(model_lib.from_pretrained(path, **options)) / count
        results[name] = dict(bytes_per_param=per_param, tok_s=tok_s, tokens=tokens, load=load)
        print(f"{name}: load {load:.1f} s, {tok_s:.2f} tok/s, {per_param:.2f} B/param", flush=True)
    print(f"\nfile: {gguf.name}, {gguf.stat().st_size / 2**20:.1f} MiB, {count} parameters\n")
    base = results.get("bf16", next(iter(results.values())))["tokens"]
    f32 = results.get("gguf-q4_1-f32", {}).get("tokens")
    print("| format | bytes / param (loaded) | decode tok/s | greedy match vs bf16 | first divergence | match vs float32 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rate, first = match(r["tokens"], base)
        vs_f32 = f"{match(r['tokens'], f32)[0]:.3f}" if f32 else "-"
        print(f"| {name} | {r['bytes_per_param']:.2f} | {r['tok_s']:.2f} | {rate:.3f} | "
              f"{first if first is not None else '-'} | {vs_f32} |")


if __name__ == "__main__":
    main()
