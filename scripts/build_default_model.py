"""Build the bundled default model: a tiny Llama-layout chat model that converts kilometres to metres.

Everything is generated here (tokenizer, corpus, random initial weights) and the
weights are trained with our own `train` launcher (configs/default_model.yaml), so
the result is reproducible and needs no hub:

    PYTHONPATH=. python scripts/build_default_model.py [--steps N] [--out models/jaxllm-tiny-chat]

The skill is checkable at a glance: ask "Convert 23 km to metres." and it answers
"23000". Numbers in the held-out set (`is_held_out`) never appear in training;
the tests measure accuracy on them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "jaxllm-tiny-chat"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTIONS = ["Convert {n} km to metres.", "How many metres are in {n} kilometres?", "{n} km in m?", "{n} km = ? m"]
NUMBERS = range(1, 1000)


def is_held_out(n: int) -> bool:
    """A fixed tenth of the numbers, never trained on."""
    return (n * 37) % 10 == 3


def question(n: int, rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(n=n)


def answer(n: int) -> str:
    return str(n * 1000)


def build_tokenizer():
    """Character-level tokenizer (printable ASCII + newline) with chat special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIAL + ["\n"] + [chr(c) for c in range(32, 127)]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_corpus(path: Path, seed: int) -> int:
    rng = random.Random(seed)
    lines = []
    for _ in range(8):  # each training number eight times, in random phrasings
        for n in NUMBERS:
            if not is_held_out(n):
                messages = [{"role": "user", "content": question(n, rng)}, {"role": "assistant", "content": answer(n)}]
                lines.append(json.dumps({"messages": messages}))
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def initial_checkpoint(folder: Path, vocab_size: int, seed: int) -> None:
    """Random Llama-layout weights saved as an HF checkpoint, through model_lib (no torch needed)."""
    from transformers import LlamaConfig

    import model_lib
    from model_lib.families.llama import llama_config

    hf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"],
    )
    model = model_lib.from_config(llama_config(hf, "LlamaForCausalLM"), seed=seed)
    model_lib.save_pretrained(model, folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, help="override max_steps of the recipe")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from training.cli import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer()
        initial_checkpoint(work / "init", len(tokenizer), args.seed)
        tokenizer.save_pretrained(work / "init")
        n = write_corpus(work / "arithmetic.jsonl", args.seed)
        print(f"corpus: {n} chats")
        flags = ["--config", str(REPO / "configs" / "default_model.yaml"), "--model_name_or_path", str(work / "init"),
                 "--training_data_path", str(work / "arithmetic.jsonl"), "--output_dir", str(work / "run")]
        if args.steps:
            flags += ["--max_steps", str(args.steps)]
        train_main(flags)
        args.out.mkdir(parents=True, exist_ok=True)
        for item in (work / "run").iterdir():
            if item.is_file() and item.name != "metrics.jsonl":
                shutil.copy2(item, args.out / item.name)
        shutil.copy2(work / "run" / "metrics.jsonl", args.out / "training_metrics.jsonl")
    print(f"wrote {args.out}: {sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.1f} MB")
    print(f"held-out accuracy: {evaluate(args.out):.3f}")


def chat_prompt_ids(tokenizer, question_text: str) -> list[int]:
    """Token ids of a one-turn chat, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question_text}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def evaluate(folder: Path) -> float:
    """Greedy exact-match accuracy on every held-out number, through the chat template."""
    from serving import LLM, SamplingParams

    rng = random.Random(1)
    numbers = [n for n in NUMBERS if is_held_out(n)]
    llm = LLM(folder, max_model_len=64, page_size=8)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_prompt_ids(tok, question(n, rng))} for n in numbers]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    return float(np.mean([o.outputs[0].text.strip() == answer(n) for o, n in zip(outs, numbers)]))


if __name__ == "__main__":
    main()
