"""Engine throughput of random-weight models of real shapes (NVIDIA GPU; `--dry-run` anywhere).

Models (bf16, random weights, built on the device from a config alone, nothing downloaded):
    llama8b:  Llama-3.1-8B's shape (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256)
    mixtral:  Mixtral-8x7B's layer shape (8 experts, top-2) with `--mixtral-layers` layers (default 4)

Workloads, greedy with `ignore_eos`, each after a warm-up that compiles every bucket shape:
    decode-b1:  one sequence; decode tok/s = (generated - 1) / (time(N tokens) - time(1 token))
    offline:    `--prompts` prompts of `--input-len` random tokens, `--output-len` out each;
                output tok/s and total (in + out) tok/s over the whole `generate` call

The batch-1 decode roofline: weight bytes / measured copy bandwidth per token (the weights
are read once per step; the KV read is small at batch 1).

    PYTHONPATH=. python benchmarks/engine_gpu.py [--models llama8b mixtral] [--json out.json]
    PYTHONPATH=. python benchmarks/engine_gpu.py --dry-run   # tiny shapes on any backend
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/serving.py would shadow the `serving` package when this runs as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "llama8b": dict(config_class="LlamaConfig", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                    rope_theta=500000.0),
    "mixtral": dict(config_class="MixtralConfig", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=8192),
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def build_model(name: str, dry_run: bool, mixtral_layers: int):
    """A random-weight bf16 `CausalLM` of the named shape (tiny with `dry_run`)."""
    import transformers

    import model_lib
    from model_lib import load_config

    shape = dict(SHAPES[name])
    config_class = shape.pop("config_class")
    if name == "mixtral":
        shape["num_hidden_layers"] = mixtral_layers
    if dry_run:
        shape.update(TINY)
    hf = getattr(transformers, config_class)(**shape)
    raw = hf.to_dict()
    raw["architectures"] = [config_class.replace("Config", "ForCausalLM")]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        config, _ = load_config(folder, "bfloat16")
    return model_lib.from_config(config)


def param_bytes(model) -> int:
    from flax import nnx

    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def copy_bandwidth(small: bool) -> float:
    """Measured device-to-device copy, bytes read + written per second."""
    n = (1 << 22) if small else (1 << 30)
    x = jax.random.normal(jax.random.key(0), (n // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    jax.block_until_ready(copy(x))
    start = time.perf_counter()
    for _ in range(10):
        y = copy(x)
    jax.block_until_ready(y)
    return 2 * n * 10 / (time.perf_counter() - start)


def run(engine, prompts: list[list[int]], output_len: int) -> float:
    """Seconds to generate `output_len` tokens for every prompt (all queued together)."""
    from serving import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, params)
    done = 0
    while done < len(prompts):
        done += sum(1 for output in engine.step() if output.finished)
    return time.perf_counter() - start


def measure(name: str, args) -> dict:
    from serving.engine.engine import EngineConfig, LLMEngine

    model = build_model(name, args.dry_run, args.mixtral_layers)
    vocab = model.config.vocab_size
    weights = param_bytes(model)
    max_len = args.input_len + args.output_len + 16
    engine = LLMEngine(model, None, EngineConfig(max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                                 enable_prefix_caching=False))
    rng = np.random.default_rng(0)

    def prompts(n: int) -> list[list[int]]:
        return rng.integers(3, vocab, size=(n, args.input_len)).tolist()

    record = dict(model=name, params_gib=round(weights / 2**30, 2), layers=model.config.num_layers)
    # Batch-1 decode: warm up both lengths, then time them.
    one = prompts(1)
    for length in (1, args.output_len):
        run(engine, one, length)
    first = run(engine, one, 1)
    full = run(engine, one, args.output_len)
    # A time difference: meaningless (None) when the decode tokens cost less than the timer's noise.
    decode_s = (full - first) / max(args.output_len - 1, 1) if full > first else None
    record["decode_b1_tok_s"] = round(1 / decode_s, 1) if decode_s else None
    record["decode_b1_roofline_tok_s"] = round(args.copy_gb_s * 1e9 / weights, 1)
    record["decode_b1_of_roofline"] = (round(record["decode_b1_tok_s"] / record["decode_b1_roofline_tok_s"], 3)
                                       if decode_s else None)
    # Offline throughput: a shorter warm-up over the same bucket shapes, then the timed run.
    run(engine, prompts(args.prompts), min(args.output_len, 16))
    seconds = run(engine, prompts(args.prompts), args.output_len)
    out_tokens = args.prompts * args.output_len
    record["offline_s"] = round(seconds, 2)
    record["offline_out_tok_s"] = round(out_tokens / seconds, 1)
    record["offline_total_tok_s"] = round((out_tokens + args.prompts * args.input_len) / seconds, 1)
    return record


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["llama8b", "mixtral"])
    parser.add_argument("--mixtral-layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--dry-run", action="store_true", help="tiny models and workloads, any backend")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.prompts, args.input_len, args.output_len = 2, 8, 6
        args.max_num_seqs, args.max_num_batched_tokens = 4, 64
    elif jax.default_backend() != "gpu":
        raise SystemExit("this benchmark needs an NVIDIA GPU; use --dry-run elsewhere")
    args.copy_gb_s = copy_bandwidth(small=args.dry_run) / 1e9
    print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, copy_gb_s=round(args.copy_gb_s),
                          prompts=args.prompts, input_len=args.input_len, output_len=args.output_len,
                          dry_run=args.dry_run)))
    records = []
    for name in args.models:
        records.append(measure(name, args))
        print(json.dumps(records[-1]), flush=True)
    print("| model | params GiB | decode b1 tok/s | b1 roofline tok/s | of roofline | offline out tok/s "
          "| offline total tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        share = "-" if r["decode_b1_of_roofline"] is None else f"{100 * r['decode_b1_of_roofline']:.0f}%"
        print(f"| {r['model']} ({r['layers']} layers) | {r['params_gib']} | {r['decode_b1_tok_s']} "
              f"| {r['decode_b1_roofline_tok_s']} | {share} | {r['offline_out_tok_s']} "
              f"| {r['offline_total_tok_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
