"""KV cache dtypes (`kv_cache_dtype`) on the default model (SmolLM2-135M-Instruct) on CPU: bytes per token per
layer, greedy decode tokens/s and greedy agreement with "auto" over 256 tokens, every row in one process.

The model runs in float32 (dequantized from the Q4_1 GGUF; bfloat16 dots are slow on XLA:CPU), so "auto" is a
float32 cache. Rows: auto, bfloat16 pages, and quantized pages with a float32 scale per token and kv head: int8,
fp8 (e4m3), fp8_e5m2. Bytes per token per layer: K and V of every kv head, scales included. Decode: one chat
prompt, 256 tokens, `ignore_eos`, batch 1, after a short warm-up generation of the same shapes (compilation
excluded: pages of 64 tokens keep every page table in one bucket, and without prefix caching the timed prefill
has the warm-up's shape). On the CPU the attention is the jnp path, which dequantizes gathered pages before the dot: expect no
speed-up here (the pages are smaller, the work is not); the Triton kernel is the GPU path.

    python -m benchmarks.kv_cache_dtype_cpu [--tokens 256] [--rows auto,int8]   # from the repository root
"""

from __future__ import annotations

from benchmarks.quantized_cpu import greedy_decode, match, parse_args
from pallas_kernels.paged_attention.kv_quant import bytes_per_token, resolve_kv_cache_dtype
from serving import LLM
from serving.default_model import default_model_path

ROWS = ("auto", "bfloat16", "int8", "fp8", "fp8_e5m2")
MODEL_DTYPE = "float32"


def main() -> None:
    args = parse_args(ROWS)
    gguf = default_model_path()
    results = {}
    for name in args.formats.split(","):
        llm = LLM(gguf, dtype=MODEL_DTYPE, max_model_len=512, max_num_seqs=1, page_size=64,
                  enable_prefix_caching=False, kv_cache_dtype=name)
        config = llm.engine.model_config
        kv_heads = config.layer_cache_kv_heads(0)
        per_layer = 2 * kv_heads * bytes_per_token(config.head_dim, resolve_kv_cache_dtype(name, config.dtype))
        tokens, tok_s = greedy_decode(llm, args.tokens)
        del llm
        results[name] = dict(bytes=per_layer, tok_s=tok_s, tokens=tokens)
        print(f"{name}: {per_layer} B/token/layer, {tok_s:.2f} tok/s", flush=True)
    print(f"\nmodel: {gguf.name} in {MODEL_DTYPE}, {config.num_layers} layers, {kv_heads} kv heads x head_dim "
          f"{config.head_dim}\n")
    base = results.get("auto", next(iter(results.values())))
    print("| kv_cache_dtype | bytes / token / layer | vs auto | decode tok/s | vs auto | greedy match vs auto | "
          "first divergence |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate, first = match(r["tokens"], base["tokens"])
        print(f"| {name} | {r['bytes']} | {r['bytes'] / base['bytes']:.3f} | {r['tok_s']:.2f} | "
              f"{r['tok_s'] / base['tok_s']:.2f} | {rate:.3f} | {first if first is not None else '-'} |")


if __name__ == "__main__":
    main()
