"""Offline generation throughput on this machine's CPU: `LLM.generate` vs transformers.

Both run the same random-weight Llama-layout model (built here, nothing
downloaded), greedy, fixed prompt and output lengths, at each batch size, in one
process. Our figure excludes compilation (a warm-up run with the same shapes goes
first, timed as "warm-up"); transformers gets a warm-up run too. Each batch size then runs `--rounds` timed
rounds on fresh prompts, the two implementations alternating which goes first; the ratio is the median of the
rounds' ratios (their range is printed beside it), as the machine's own speed drifts between runs. Each round
also times a one-token `generate` of each on other fresh prompts: `prefill_s` (the prompts alone) and
`decode_step_ms` (the rest of the whole run over its further steps), jaxllm / transformers. `--preset` picks
a named shape (`smollm2-135m`: the SmolLM2-135M-Instruct layout; `llama-15m`);
single flags override it. `--compare-unrolled` also times an engine whose layers
are unrolled (`scan_layers=False`, the CPU default) in the same process, against
one whose layer stacks are scanned (`scan_layers=True`).

Roofline: `workload_flops` counts the useful float work of one batch (the matmuls of
every layer for every prompt and fed token, attention's QK^T and PV over the causal
context, the LM head for the rows that give a token); padding and recomputation are
not counted, so both implementations are measured against the same figure. Two
ceilings are measured in the same process, for jnp (XLA:CPU) and torch: a large
square float32 matmul (compute-bound) and `batch` rows through a weight as large as
the model's matmul weights (the weight-streaming bound of a decode step). Each row
prints achieved GFLOP/s for both implementations.

    PYTHONPATH=. python -m benchmarks.offline_cpu --preset smollm2-135m --batches 1 16 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from benchmarks.machine import cpu_device
from benchmarks.timing import best_seconds
from serving import LLM, SamplingParams


PRESETS = {
    "smollm2-135m": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    "llama-15m": dict(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2, vocab=8000, tied=False),
}


def build_model(args: argparse.Namespace, folder: Path) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tied,
        max_position_embeddings=args.prompt_len + args.output_len + 16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def workload_flops(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """Useful FLOPs of generating `output_len` tokens after `prompt_len`-token prompts, `batch` sequences.

    Prefill feeds every prompt token; decode feeds output_len - 1 tokens (the last sampled one is
    never fed). Matmul FLOPs are 2 x weights per fed token; attention is 4 x heads x head_dim per
    (token, key) pair over the causal context; the LM head runs once per generated token.
    """
    head_dim = args.hidden // args.heads
    q, kv = args.heads * head_dim, args.kv_heads * head_dim
    layer_weights = args.hidden * (q + 2 * kv) + q * args.hidden + 3 * args.hidden * args.intermediate
    p, n = args.prompt_len, args.output_len
    decode_tokens = n - 1
    prefill_keys = p * (p + 1) // 2  # token i attends to i + 1 keys
    decode_keys = sum(p + j + 1 for j in range(1, n))  # the j-th fed output token sits at position p + j
    attention = 4 * args.heads * head_dim * args.layers
    lm_head = 2 * args.hidden * args.vocab * n
    return {
        "prefill": batch * (2 * layer_weights * args.layers * p + attention * prefill_keys),
        "decode": batch * (2 * layer_weights * args.layers * decode_tokens + attention * decode_keys),
        "lm_head": batch * lm_head,
    }


def matmul_ceilings(args: argparse.Namespace, batch: int, size: int = 2048) -> dict[str, float]:
    """GFLOP/s of float32 matmuls on this machine, jnp and torch: `size`^3, and `batch` rows x all weights."""
    import jax.numpy as jnp

    weights = args.layers * (args.hidden * 4 * args.hidden + 3 * args.hidden * args.intermediate) + args.hidden * args.vocab
    width = weights // args.hidden  # [hidden, width]: as many bytes as the model's matmul weights
    rng = np.random.RandomState(1)
    square = rng.standard_normal((size, size)).astype(np.float32)
    rows, wide = rng.standard_normal((batch, args.hidden)).astype(np.float32), rng.standard_normal((args.hidden, width)).astype(np.float32)
    matmul = jax.jit(jnp.matmul)
    out = {}
    for name, (a, b) in {"square": (square, square), "stream": (rows, wide)}.items():
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out[f"jnp_{name}"] = flops / best_seconds(lambda: matmul(ja, jb).block_until_ready()) / 1e9
        with torch.no_grad():
            out[f"torch_{name}"] = flops / best_seconds(lambda: torch.matmul(ta, tb)) / 1e9
    return out


def hf_seconds(model, prompts: np.ndarray, output_len: int) -> float:
    """Seconds of one greedy `generate` of exactly `output_len` tokens per prompt (after a small warm-up)."""
    ids = torch.as_tensor(prompts)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + output_len
    return elapsed


def ours_warmup_seconds(llm: LLM, prompts: np.ndarray, output_len: int) -> float:
    """Seconds of a first `generate` on other prompts of the same shapes: compiles every shape, leaves no
    prefix-cache hits for the timed prompts."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p[::-1].tolist()} for p in prompts], params)
    return time.perf_counter() - start


def ours_seconds(llm: LLM, prompts: np.ndarray, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def timed_rounds(hf_model, llm: LLM, rng: np.random.RandomState, args: argparse.Namespace,
                 batch: int) -> list[dict[str, float]]:
    """Per round, seconds of a whole generate (`ours`, `hf`) and of a one-token generate on other fresh
    prompts (`ours_prompt`, `hf_prompt`: the prefill, with no prefix-cache hit), the two implementations
    alternating which goes first: this machine's speed drifts by tens of percent within a minute, and a drift
    between two single runs lands in their ratio."""
    rounds = []
    for index in range(args.rounds):
        prompts, prefill_only = (rng.randint(3, args.vocab, size=(batch, args.prompt_len)).astype(np.int64)
                                 for _ in range(2))
        timings = {"ours": lambda: ours_seconds(llm, prompts, args.output_len),
                   "hf": lambda: hf_seconds(hf_model, prompts, args.output_len),
                   "ours_prompt": lambda: ours_seconds(llm, prefill_only, 1),
                   "hf_prompt": lambda: hf_seconds(hf_model, prefill_only, 1)}
        order = list(timings) if index % 2 else ["hf", "ours", "hf_prompt", "ours_prompt"]
        rounds.append({name: timings[name]() for name in order})
    return rounds


def prefill_and_step(rounds: list[dict[str, float]], who: str, output_len: int) -> tuple[float, float]:
    """Median seconds of `who`'s prefill (its one-token generate) and milliseconds per decode step (the rest of a
    whole generate over its `output_len - 1` further steps)."""
    prefill = float(np.median([r[f"{who}_prompt"] for r in rounds]))
    steps = [(r[who] - r[f"{who}_prompt"]) / max(1, output_len - 1) for r in rounds]
    return prefill, 1e3 * float(np.median(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int, help="default: 8/3 of hidden, rounded down to 16")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="tie the LM head")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compare-unrolled", action="store_true", help="also time the layers unrolled")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="the engine's token budget per step (default: the engine's own, 2048)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per batch size, jaxllm and transformers alternating (1-20); the ratio "
                             "column is the median of the rounds' ratios, the tok/s columns their medians")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in 1-20")
    defaults = dict(hidden=256, intermediate=None, layers=4, heads=8, kv_heads=2, vocab=4096, tied=False)
    for name, value in {**defaults, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.intermediate = args.intermediate or args.hidden * 8 // 3 // 16 * 16

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hf_model = build_model(args, folder)
        budget = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
        engine_args = dict(dtype="float32", max_model_len=args.prompt_len + args.output_len + 16,
                           max_num_seqs=max(args.batches), page_size=16, **budget)
        llm = LLM(folder, **engine_args, **({"scan_layers": True} if args.compare_unrolled else {}))
        unrolled = LLM(folder, **engine_args, scan_layers=False) if args.compare_unrolled else None
        rng = np.random.RandomState(0)
        results = []
        for batch in args.batches:
            prompts = rng.randint(3, args.vocab, size=(batch, args.prompt_len)).astype(np.int64)
            warmup = ours_warmup_seconds(llm, prompts, args.output_len)
            rounds = timed_rounds(hf_model, llm, rng, args, batch)
            tokens = batch * args.output_len
            ours, hf = (float(np.median([tokens / r[who] for r in rounds])) for who in ("ours", "hf"))
            ratios = [r["hf"] / r["ours"] for r in rounds]
            (ours_prefill, ours_step), (hf_prefill, hf_step) = (prefill_and_step(rounds, who, args.output_len)
                                                                for who in ("ours", "hf"))
            gflop = sum(workload_flops(args, batch).values()) / 1e9
            ceilings = matmul_ceilings(args, batch)
            result = dict(batch=batch, jaxllm_tok_s=round(ours, 1), transformers_tok_s=round(hf, 1),
                          ratio=round(float(np.median(ratios)), 2),
                          ratio_range=f"{min(ratios):.2f}-{max(ratios):.2f}", jaxllm_warmup_s=round(warmup, 1),
                          prefill_s=f"{ours_prefill:.3f} / {hf_prefill:.3f}",
                          decode_step_ms=f"{ours_step:.1f} / {hf_step:.1f}",
                          gflop=round(gflop, 1),
                          jaxllm_gflop_s=round(gflop * ours / tokens, 1),
                          transformers_gflop_s=round(gflop * hf / tokens, 1),
                          ceilings=f"{ceilings['jnp_square']:.1f} / {ceilings['torch_square']:.1f}, "
                                   f"{ceilings['jnp_stream']:.1f} / {ceilings['torch_stream']:.1f}")
            if unrolled is not None:
                flat_warmup = ours_warmup_seconds(unrolled, prompts, args.output_len)
                flat = tokens / ours_seconds(unrolled, prompts, args.output_len)
                result.update(unrolled_tok_s=round(flat, 1), scanned_over_unrolled=round(ours / flat, 2),
                              unrolled_warmup_s=round(flat_warmup, 1))
            results.append(result)
    meta = dict(device=cpu_device(),
                jax=jax.__version__, torch=torch.__version__, torch_mkl=torch.backends.mkl.is_available(),
                transformers=transformers.__version__,
                model=f"Llama h{args.hidden} i{args.intermediate} L{args.layers} H{args.heads}/{args.kv_heads} "
                      f"V{args.vocab} {'tied' if args.tied else 'untied'} float32",
                prompt_len=args.prompt_len, output_len=args.output_len)
    print(json.dumps(meta))
    # ceilings: matmul GFLOP/s, jnp / torch square, jnp / torch batch rows
    # prefill_s, decode_step_ms: jaxllm / transformers, medians of the rounds
    columns = ["batch", "jaxllm_tok_s", "transformers_tok_s", "ratio", "ratio_range", "jaxllm_warmup_s", "prefill_s",
               "decode_step_ms", "gflop", "jaxllm_gflop_s", "transformers_gflop_s", "ceilings"]
    if args.compare_unrolled:
        columns += ["unrolled_tok_s", "scanned_over_unrolled", "unrolled_warmup_s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
