"""Parameter memory of QLoRA (NF4 base + float32 adapters) against bf16 LoRA, same model and adapters.

Builds a random-weight Llama layout locally (nothing downloaded), applies LoRA r=16 to
all linear layers, and counts the bytes held by parameters and quantized weights.

    PYTHONPATH=. python benchmarks/qlora_memory.py [--hidden 2048 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import torch
import transformers

import model_lib
from model_lib.lora import LoraConfig, apply_lora, param_bytes, quantize_model_nf4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 512,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(tmp))
        sizes = {}
        for name in ("bf16 LoRA", "QLoRA (NF4)"):
            model = model_lib.from_pretrained(tmp, dtype="bfloat16")
            if name.startswith("QLoRA"):
                quantize_model_nf4(model)
            apply_lora(model, lora)
            sizes[name] = param_bytes(model)
            del model
    gib = 2**30
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; LoRA r=16 all-linear; jax {jax.__version__}")
    print("| setup | parameter bytes | GiB | vs bf16 LoRA |")
    print("|---|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size} | {size / gib:.3f} | {size / sizes['bf16 LoRA']:.2f} |")


if __name__ == "__main__":
    main()
