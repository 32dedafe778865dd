"""Speculative decoding at real shapes on an NVIDIA GPU (`--dry-run`: tiny shapes, any backend).

Random bf16 weights, nothing downloaded. Greedy decode tok/s at batch 1 and 16 (`--batches`) for:

    plain        the Llama-3.1-8B-shaped target decoding one token per step (the baseline)
    ngram        prompt lookup, k = `--k` (random prompts: few matches, mostly its overhead)
    draft_model  a 2-layer draft of the target's shape (embeddings and head included)
    eagle3       an EAGLE-3 head of Llama-3.1-8B's published shape (one layer, draft vocabulary 32000)
    mtp          a DeepSeek-V3-style target (MLA, MoE, `--mtp-layers` layers, hidden 4096) with one MTP
                 layer, against the same model decoding plainly

Random draft heads are almost never accepted: these rows measure the overhead of drafting and
verifying, not a speed-up. Each engine runs its workload once untimed (compiling its shapes), then
once timed; `--budget-s` stops starting new engines once spent (the rows left say so).

    PYTHONPATH=. python benchmarks/spec_decode_gpu.py [--batches 1 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax
import numpy as np

LLAMA8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
DEEPSEEK = dict(vocab_size=129280, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1408,
                num_attention_heads=32, num_key_value_heads=32, q_lora_rank=1536, kv_lora_rank=512,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6,
                n_shared_experts=2, first_k_dense_replace=1, n_group=8, topk_group=4, max_position_embeddings=8192)
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
TINY_DEEPSEEK = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                     num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=4, topk_group=2)
EAGLE3_INTERMEDIATE, EAGLE3_DRAFT_VOCAB = 14336, 32000


def random_model(config_class: str, shape: dict, mtp: bool = False):
    """A random bf16 `CausalLM` of `shape` built on the device from a config alone (with an MTP layer when `mtp`)."""
    import transformers

    import model_lib

    raw = getattr(transformers, config_class)(**shape).to_dict()
    raw["architectures"] = [config_class.replace("Config", "ForCausalLM")]
    raw["num_nextn_predict_layers"] = 1 if mtp else 0
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        config, _ = model_lib.load_config(folder, "bfloat16")
    return model_lib.from_config(config)


def write_eagle3(folder: Path, target: dict, intermediate: int) -> Path:
    """A random EAGLE-3 head in the published layout (Llama-3.1-8B's: MLP `intermediate` 14336, draft vocabulary
    32000 or half the target's) for a target of shape `target`."""
    import torch
    from safetensors.torch import save_file

    hidden, vocab = target["hidden_size"], target["vocab_size"]
    heads, kv_heads = target["num_attention_heads"], target["num_key_value_heads"]
    head_dim = hidden // heads
    inner = intermediate
    draft_vocab = min(EAGLE3_DRAFT_VOCAB, vocab // 2)
    gen = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"fc.weight": w(hidden, 3 * hidden), "norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               "lm_head.weight": w(draft_vocab, hidden),
               "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
               "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
               "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
               "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
               "midlayer.mlp.gate_proj.weight": w(inner, hidden), "midlayer.mlp.up_proj.weight": w(inner, hidden),
               "midlayer.mlp.down_proj.weight": w(hidden, inner),
               "d2t": torch.zeros(draft_vocab, dtype=torch.int64), "t2d": torch.ones(vocab, dtype=torch.bool)}
    for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        tensors[f"midlayer.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=hidden,
                  intermediate_size=inner, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  vocab_size=vocab, draft_vocab_size=draft_vocab, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=500000.0, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def decode_tok_s(engine, batch: int, input_len: int, output_len: int) -> float:
    """Output tok/s of `batch` random prompts decoded greedily together (after an untimed run)."""
    from benchmarks.engine_gpu import run

    prompts = np.random.default_rng(batch).integers(3, engine.model_config.vocab_size, (batch, input_len)).tolist()
    run(engine, prompts, output_len)
    return batch * output_len / run(engine, prompts, output_len)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ngram", "draft_model", "eagle3", "mtp"],
                        choices=["ngram", "draft_model", "eagle3", "mtp"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--mtp-layers", type=int, default=8, help="decoder layers of the DeepSeek-style MTP target")
    parser.add_argument("--budget-s", type=float, default=500.0, help="start no engine after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny models, any backend")
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.input_len, args.output_len = 8, 6
    elif jax.default_backend() != "gpu":
        raise SystemExit("this benchmark needs an NVIDIA GPU; use --dry-run elsewhere")
    from model_lib.eagle3 import load_eagle3
    from model_lib.families.deepseek_mtp import MTPDraft
    from serving.engine.engine import EngineConfig, LLMEngine

    began = time.perf_counter()
    llama = TINY_LLAMA if args.dry_run else LLAMA8B
    deepseek = {**(TINY_DEEPSEEK if args.dry_run else DEEPSEEK), "num_hidden_layers": 2 if args.dry_run else args.mtp_layers}
    sizes = dict(max_model_len=args.input_len + args.output_len + 2 * args.k + 8, max_num_seqs=max(args.batches),
                 max_num_batched_tokens=max(256, max(args.batches) * (args.k + 1)), enable_prefix_caching=False,
                 enforce_eager=True, scan_layers=False)
    print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, k=args.k, input_len=args.input_len,
                          output_len=args.output_len, dry_run=args.dry_run,
                          note="random draft heads: overhead only, acceptance ~0")))
    records = []
    with tempfile.TemporaryDirectory() as root:
        target = random_model("LlamaConfig", llama)
        drafts = {
            "ngram": lambda: ({"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4}, None),
            "draft_model": lambda: ({"method": "draft_model", "model": "random"},
                                    random_model("LlamaConfig", {**llama, "num_hidden_layers": 2})),
            "eagle3": lambda: ({"method": "eagle3", "model": "random"},
                               load_eagle3(write_eagle3(Path(root) / "eagle3", llama, llama["intermediate_size"] if args.dry_run
                                                        else EAGLE3_INTERMEDIATE), target)),
        }
        runs = [("plain", lambda: target, lambda: (None, None))]
        runs += [(m, lambda: target, drafts[m]) for m in args.methods if m != "mtp"]
        if "mtp" in args.methods:
            deep = {}
            runs += [("plain (mtp target)", lambda: deep.setdefault("m", random_model("DeepseekV3Config", deepseek, True)),
                      lambda: (None, None)),
                     ("mtp", lambda: deep["m"], lambda: ({"method": "mtp"}, MTPDraft(deep["m"])))]
        baseline: dict[int, float] = {}
        for name, model_of, draft_of in runs:
            if time.perf_counter() - began > args.budget_s:
                records.append(dict(method=name, skipped=f"out of time (--budget-s {args.budget_s:.0f})"))
                print(json.dumps(records[-1]), flush=True)
                continue
            model = model_of()
            spec, draft = draft_of()
            speculative = None if spec is None else {**spec, "num_speculative_tokens": args.k}
            engine = LLMEngine(model, None, EngineConfig(**sizes, speculative_config=speculative), draft_model=draft)
            for batch in args.batches:
                tok_s = decode_tok_s(engine, batch, args.input_len, args.output_len)
                if spec is None:
                    baseline[batch] = tok_s
                stats = engine.spec.stats if engine.spec is not None else None
                records.append(dict(method=name, batch=batch, tok_s=round(tok_s, 1),
                                    of_plain=round(tok_s / baseline[batch], 3),
                                    acceptance=None if stats is None else round(stats.acceptance_rate, 3)))
                print(json.dumps(records[-1]), flush=True)
            del engine
    print("| method | batch | decode tok/s | of plain | acceptance |")
    print("|---|---|---|---|---|")
    for r in records:
        if "skipped" in r:
            print(f"| {r['method']} | - | {r['skipped']} | - | - |")
        else:
            print(f"| {r['method']} | {r['batch']} | {r['tok_s']} | {r['of_plain']} | {r['acceptance']} |")
    print("Random EAGLE-3 / MTP / draft weights: these rows measure overhead only (acceptance ~0), not a speed-up.")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
