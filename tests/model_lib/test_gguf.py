"""GGUF checkpoints: tiny files written as llama.cpp would (tests/gguf_files.py), loaded here and by transformers.

One table: every GGUF architecture transformers reads that we register, in Q8_0, and every ggml
type the loader is asked to cover, on one Llama whose rows fit the 256-wide K-quant blocks.
Parity: float32 logits of the same file against `AutoModelForCausalLM.from_pretrained(gguf_file=)`.
"""

from __future__ import annotations

import numpy as np
import pytest

import model_lib
from model_lib import gguf
from tests.gguf_files import write_gguf
from tests.tiny_models import (
    BLOOM_DIMS,
    DIMS,
    ROUTER_NOISE,
    SMALL_TOKENS,
    VOCAB,
    TinyCase,
    assert_logits_close,
    build_checkpoint,
    hf_logits,
    random_ids,
)

MOE = dict(num_experts=4, num_experts_per_tok=2)
# A Mistral GGUF says "llama" (llama.cpp converts it as one), and transformers loads it as Llama.
# transformers' GGUF reader maps no MoE widths, GPT-2 n_inner / n_positions or Falcon ffn width: the
# config class defaults apply, so these cases use them.
ARCHITECTURES = {
    "llama": TinyCase("gguf-llama", "LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": TinyCase("gguf-mistral", "MistralConfig", dict(num_key_value_heads=2)),
    "qwen2": TinyCase("gguf-qwen2", "Qwen2Config", dict(num_key_value_heads=2)),
    "qwen2moe": TinyCase("gguf-qwen2moe", "Qwen2MoeConfig", dict(num_key_value_heads=2, **MOE), noise=ROUTER_NOISE),
    "qwen3": TinyCase("gguf-qwen3", "Qwen3Config", dict(num_key_value_heads=2, head_dim=128)),
    "qwen3moe": TinyCase("gguf-qwen3moe", "Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32, **MOE), noise=ROUTER_NOISE),
    "phi3": TinyCase("gguf-phi3", "Phi3Config", dict(num_key_value_heads=2, **SMALL_TOKENS)),
    "gemma2": TinyCase("gguf-gemma2", "Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=4)),
    "gemma3": TinyCase("gguf-gemma3", "Gemma3TextConfig", dict(num_key_value_heads=1, head_dim=16, sliding_window=4)),
    "starcoder2": TinyCase("gguf-starcoder2", "Starcoder2Config", dict(num_key_value_heads=2, **SMALL_TOKENS)),
    "nemotron": TinyCase("gguf-nemotron", "NemotronConfig", dict(num_key_value_heads=2, **SMALL_TOKENS)),
    "gpt2": TinyCase("gguf-gpt2", "GPT2Config", dict(SMALL_TOKENS), dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)),
    "bloom": TinyCase("gguf-bloom", "BloomConfig", {}, BLOOM_DIMS),
    "falcon": TinyCase("gguf-falcon", "FalconConfig", {}, dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
}
# Every row of every 2-D tensor a whole number of 256-wide K-quant blocks.
QUANT_CASE = TinyCase("gguf-llama-256", "LlamaConfig", dict(num_key_value_heads=2), {**DIMS, "hidden_size": 256, "intermediate_size": 256})
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TABLE = [(arch, case, "Q8_0") for arch, case in ARCHITECTURES.items()] + [("llama256", QUANT_CASE, q) for q in QUANT_TYPES]

_SOURCES: dict[str, tuple] = {}


def _source(case: TinyCase, tmp_path_factory):
    """The tiny HF checkpoint a case's GGUF files are converted from, built once per session."""
    if case.name not in _SOURCES:
        folder = tmp_path_factory.mktemp(case.name)
        model = build_checkpoint(case, folder)
        _SOURCES[case.name] = folder, model.config
    return _SOURCES[case.name]


@pytest.mark.parametrize(("arch", "case", "qtype"), TABLE, ids=[f"{a}-{q}" for a, _, q in TABLE])
def test_gguf_logits_match_transformers(arch, case, qtype, tmp_path, tmp_path_factory, forward):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, hf_config = _source(case, tmp_path_factory)
    file = write_gguf(folder, hf_config, tmp_path / f"{case.name}-{qtype}.gguf", qtype, name=f"tiny {arch}")

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32).eval()
    expected_config = AutoConfig.from_pretrained(tmp_path, gguf_file=file.name).to_dict()
    ours_config = gguf.load_hf_config(file).to_dict()
    assert {k: v for k, v in ours_config.items() if k != "_name_or_path"} == {
        k: v for k, v in expected_config.items() if k != "_name_or_path"
    }

    model = model_lib.from_pretrained(file)
    assert model.config.dtype == "float32"
    ids = random_ids(2, 12, seed=3)
    ours = np.asarray(forward(model, ids, np.ones_like(ids)))
    assert_logits_close(ours, hf_logits(reference, ids))


def test_gguf_tokenizer_matches_transformers(tmp_path, tmp_path_factory):
    from transformers import AutoTokenizer

    folder, hf_config = _source(ARCHITECTURES["llama"], tmp_path_factory)
    file = write_gguf(folder, hf_config, tmp_path / "tok.gguf", "F32")
    ours, reference = gguf.load_gguf_tokenizer(file), AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    text = "the theory of 23 km\nis in the east"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "Convert 3 km to metres."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (reference.bos_token, reference.eos_token, reference.pad_token)


def _metadata_only(path, arch: str, **uint32):
    import gguf as gguf_package

    writer = gguf_package.GGUFWriter(str(path), arch)
    for key, value in uint32.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_errors_name_the_problem(tmp_path):
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file")
    with pytest.raises(model_lib.CheckpointError, match="cannot read GGUF file"):
        model_lib.from_pretrained(not_gguf)
    with pytest.raises(model_lib.CheckpointError, match="'gptneox' is not one transformers reads"):
        model_lib.from_pretrained(_metadata_only(tmp_path / "neox.gguf", "gptneox", block_count=2))
    # A Mamba GGUF maps onto the mamba family; one without tensors names what is missing by HF name.
    with pytest.raises(model_lib.CheckpointError, match="missing tensors: backbone.embeddings.weight"):
        model_lib.from_pretrained(_metadata_only(tmp_path / "mamba.gguf", "mamba", block_count=2, vocab_size=VOCAB))
