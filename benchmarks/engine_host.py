"""Host time per engine step, and how long the device waits for the host, with a stub device step.

The model's forward is replaced by a jitted stub of the same signature (next token = previous + 1;
with `--device-ms`, a host callback that sleeps stands in for a device busy that long without
using a CPU core), so what is timed is the engine's own work: scheduling, preparing the step's
arrays, dispatch, sampling bookkeeping, appending tokens and building outputs. The parameter tree
is a real one (SmolLM2-135M's 30 layers, tiny hidden size), so flattening it costs what it costs.

    host_ms(batch)  = wall time per decode step with a trivial device step
    idle fraction   = at `--idle-batch` with a `--device-ms` device step: the gaps between one step's
                      callback ending and the next one's starting, over the time from the first start
                      to the last end (the share of the time the stub device waits for the host)

    python -m benchmarks.engine_host [--batches 1 4 16 64 256] [--steps 50] [--device-ms 8]
    python -m benchmarks.engine_host --dry-run   # two small batches, a few steps
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 512
LAYERS = 30  # SmolLM2-135M's depth: the parameter tree has its number of leaves


def build_model(layers: int = LAYERS):
    """A float32 Llama of SmolLM2-135M's depth with a tiny width (random weights, built from a config alone)."""
    import tempfile
    from pathlib import Path

    import transformers

    import model_lib
    from model_lib import load_config

    hf = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    raw = hf.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        config, _ = load_config(folder, "float32")
    return model_lib.from_config(config)


BUSY: list[tuple[float, float]] = []  # (start, end) of each stub device step's callback


def stub_forward(device_ms: float):
    """A forward of the model's signature doing trivial work: logits that make token t + 1 follow t."""

    def busy(x):
        start = time.perf_counter()
        time.sleep(device_ms / 1000)
        BUSY.append((start, time.perf_counter()))
        return x

    def forward(self, input_ids, batch, kv_caches=None, logits_indices=None):
        last = input_ids[logits_indices]
        if device_ms:
            last = jax.pure_callback(busy, jax.ShapeDtypeStruct(last.shape, last.dtype), last)
        logits = jax.nn.one_hot((last + 1) % VOCAB, VOCAB, dtype=jnp.float32) * 10.0
        return logits, kv_caches

    return forward


def decode_seconds(engine, batch: int, steps: int, tag: str) -> float:
    """Wall seconds of `steps` decode steps with `batch` sequences running (prefill not timed)."""
    from serving.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [1 + (i % 100)] * 8, params)
    for _ in range(4):  # prefill (one step at these sizes) and the first decode steps
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return seconds


def make_engine(max_num_seqs: int, layers: int):
    from serving.engine.engine import EngineConfig, LLMEngine

    config = dict(max_model_len=256, max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_num_seqs * 8, 64),
                  num_pages=max_num_seqs * 16 + 16, enable_prefix_caching=False)
    try:
        return LLMEngine(build_model(layers), None, EngineConfig(**config, enforce_eager=True))
    except TypeError:  # an engine without warm-up options
        return LLMEngine(build_model(layers), None, EngineConfig(**config))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device-ms", type=float, default=8.0, help="stub device time per step for the idle figure")
    p.add_argument("--idle-batch", type=int, default=256)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batches, args.steps, args.idle_batch, args.device_ms = [1, 4], 3, 4, 1.0
    layers = 2 if args.dry_run else LAYERS

    from model_lib import CausalLM

    original = CausalLM.forward
    result: dict = {"jax": jax.__version__, "backend": jax.default_backend(), "steps": args.steps}
    try:
        CausalLM.forward = stub_forward(0.0)
        engine = make_engine(max(args.batches), layers)
        decode_seconds(engine, max(args.batches), 2, "warm")  # compiles the shapes used below
        for b in args.batches:
            decode_seconds(engine, b, 2, f"warm{b}")
        result["host_ms"] = {b: round(1000 * decode_seconds(engine, b, args.steps, f"b{b}") / args.steps, 3)
                             for b in args.batches}
        CausalLM.forward = stub_forward(args.device_ms)
        engine = make_engine(args.idle_batch, layers)
        decode_seconds(engine, args.idle_batch, 2, "warm")
        BUSY.clear()
        wall = decode_seconds(engine, args.idle_batch, args.steps, "idle")
        spans = BUSY[4 : 4 + args.steps]  # the timed decode steps (after the prefill and first decodes)
        gaps = sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        result["idle"] = {"batch": args.idle_batch, "device_ms": args.device_ms,
                          "step_ms": round(1000 * wall / args.steps, 3),
                          "idle_fraction": round(gaps / (spans[-1][1] - spans[0][0]), 4)}
    finally:
        CausalLM.forward = original
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
