"""Fine-tuning an encoder-decoder through `train` on input/output pairs: a tiny T5 learns to reverse three
letters (served afterwards through `LLM.generate`), fully fine-tuned or with LoRA; PEFT loads the LoRA adapter
and computes our merged model's logits."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from model_lib.encdec import load_seq2seq
from serving import LLM, SamplingParams
from tests.seq2seq_models import build_seq2seq
from tests.tiny_models import build_tokenizer
from training.config import TrainConfig
from training.trainer import train

# The tiny tokenizer's ids: 0 <unk> (T5's pad and decoder start), 2 </s>.
T5_TOKENS = dict(pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
# method -> (steps, learning rate, lora_alpha, greedy exact-match accuracy it reaches on held-out words;
# chance is 1/512). LoRA cannot train T5's relative-position tables, so it learns slower than full tuning.
CASES = {"none": (300, 3e-3, 32, 0.9), "lora": (500, 5e-3, 64, 0.3)}


@pytest.fixture(scope="module")
def reverse_task(tmp_path_factory):
    """Reverse three letters: 'abc' -> 'cba'. 400 training words, 48 held out. The relative-position tables
    are drawn wide (std 2), as a pretrained T5's are, so that positions can be told apart from the start."""
    folder = tmp_path_factory.mktemp("t5")
    reference = build_seq2seq("T5ForConditionalGeneration", folder, **T5_TOKENS)
    torch.manual_seed(3)
    with torch.no_grad():
        for stack in (reference.encoder, reference.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    reference.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    words = ["".join(p) for p in itertools.product("abcdefgh", repeat=3)]
    random.Random(0).shuffle(words)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"input": w, "output": w[::-1]}) + "\n" for w in words[:400]))
    return folder, data, words[400:448], reference


@pytest.mark.parametrize("method", list(CASES))
def test_t5_fine_tune_learns_the_task(method, reverse_task, tmp_path):
    folder, data, held_out, reference = reverse_task
    steps, learning_rate, alpha, accuracy = CASES[method]
    out = tmp_path / "run"
    result = train(TrainConfig(
        model_name_or_path=str(folder), training_data_path=str(data), output_dir=str(out), peft_method=method,
        lora_r=16, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", max_steps=steps,
        per_device_train_batch_size=32, learning_rate=learning_rate, warmup_steps=10, max_seq_length=8,
        torch_dtype="float32", progress_bar=False, merge_lora=method == "lora",
    ))
    assert result.losses[-1] < 0.2 * result.losses[0]
    served = out / "merged" if method == "lora" else out
    llm = LLM(str(served), max_model_len=16, max_num_seqs=64, max_num_batched_tokens=64, num_pages=64, page_size=8)
    outputs = llm.generate(held_out, SamplingParams(temperature=0, max_tokens=5))
    texts = [o.outputs[0].text for o in outputs]
    reached = np.mean([text == w[::-1] for text, w in zip(texts, held_out)])
    print(f"{method}: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, held-out exact match {reached:.2f}")
    assert reached >= accuracy, texts
    if method != "lora":
        return

    from peft import PeftModel  # PEFT reads our adapter onto the transformers model

    peft_model = PeftModel.from_pretrained(reference, str(out)).eval()
    tokenizer = build_tokenizer()
    ids = np.array([tokenizer.encode(w) for w in held_out[:4]], np.int32)
    dec = np.array([[0] + tokenizer.encode(w[::-1]) for w in held_out[:4]], np.int32)
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor(ids).long(), decoder_input_ids=torch.tensor(dec).long()).logits.numpy()
    merged = load_seq2seq(out / "merged")
    got = np.asarray(merged(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(dec)))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
