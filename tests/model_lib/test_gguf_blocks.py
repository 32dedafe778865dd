"""GGUF Q4_0 / Q4_1 / Q8_0 blocks kept quantized (`quantization="gguf"`), on tiny files written at test
time with the gguf package's quantizers (tests/gguf_files.py).

Each kept weight (linear kernels, expert stacks, the token embedding) must dequantize to exactly the float kernel the dequantizing load reads from the
same file (`gguf.quants.dequantize`, llama.cpp's q/k row permutation undone), bit for bit in
float32; the logits must match the dequantizing load tightly (same weights, the matmul reordered)
and transformers loading the file with `gguf_file=` as the dequantized parity tests do.
"""

from __future__ import annotations

import numpy as np
import pytest

import model_lib
from model_lib.layers.moe import expert_layers
from model_lib.lora import linear_layers, param_bytes
from model_lib.quantization.gguf_blocks import GGUFBlockWeight
from model_lib.quantization.stacked import StackedWeight
from serving import LLM, SamplingParams
from tests.gguf_files import write_gguf
from tests.model_lib.test_gguf import ARCHITECTURES, _source
from tests.serving.helpers import hf_greedy, prompts
from tests.tiny_models import TinyCase, assert_logits_close, hf_logits, random_ids

pytestmark = pytest.mark.xdist_group("gguf_blocks")

CASES = {**ARCHITECTURES, "llama-tied": TinyCase("gguf-llama-tied", "LlamaConfig",
                                                  dict(num_key_value_heads=2, tie_word_embeddings=True))}
# (case, ggml type): every kept type on Llama (rotary rows permuted), a tied Llama (the head is the
# embedding's blocks), and a Qwen2-MoE (stacked experts, quantized router and shared expert) in Q4_1.
TABLE = [("llama", "Q4_0"), ("llama", "Q4_1"), ("llama", "Q8_0"), ("llama-tied", "Q8_0"), ("qwen2moe", "Q4_1")]


def _file(arch: str, qtype: str, tmp_path, tmp_path_factory):
    folder, hf_config = _source(CASES[arch], tmp_path_factory)
    return write_gguf(folder, hf_config, tmp_path / f"{arch}-{qtype}.gguf", qtype, name=f"tiny {arch}")


@pytest.mark.parametrize(("arch", "qtype"), TABLE, ids=[f"{a}-{q}" for a, q in TABLE])
def test_kept_blocks_match_the_dequantized_load_and_transformers(arch, qtype, tmp_path, tmp_path_factory, forward):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    file = _file(arch, qtype, tmp_path, tmp_path_factory)
    dequantized = model_lib.from_pretrained(file)
    kept = model_lib.from_pretrained(file, quantization="gguf")

    float_layers = linear_layers(dequantized)
    for path, layer in linear_layers(kept).items():
        if layer.quantized is None:  # 1-D in the file (Qwen2-MoE's shared-expert gate): F32
            continue
        assert isinstance(layer.quantized, GGUFBlockWeight) and layer.quantized.qtype == qtype and layer.kernel is None
        np.testing.assert_array_equal(np.asarray(layer.quantized.dequantize(jnp.float32)),
                                      np.asarray(float_layers[path].kernel[...]), err_msg=path)
    float_experts = expert_layers(dequantized)
    for path, layer in expert_layers(kept).items():
        assert isinstance(layer.quantized, StackedWeight) and isinstance(layer.quantized.stack, GGUFBlockWeight)
        np.testing.assert_array_equal(np.asarray(layer.quantized.dequantize(jnp.float32)),
                                      np.asarray(float_experts[path].kernel[...]), err_msg=path)
    assert not float_experts or expert_layers(kept)
    embed = kept.model.embed_tokens  # token_embd is block-quantized too: kept, looked up column by column
    assert isinstance(embed.quantized, GGUFBlockWeight) and embed.weight is None
    np.testing.assert_array_equal(np.asarray(embed.table()), np.asarray(dequantized.model.embed_tokens.weight[...]))
    ids = random_ids(2, 12, seed=3)
    np.testing.assert_array_equal(np.asarray(embed(ids)), np.asarray(dequantized.model.embed_tokens(ids)))
    assert param_bytes(kept) < 0.5 * param_bytes(dequantized)

    ours = np.asarray(forward(kept, ids, np.ones_like(ids)))
    assert_logits_close(ours, np.asarray(forward(dequantized, ids, np.ones_like(ids))), rel=1e-5)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32).eval()
    assert_logits_close(ours, hf_logits(reference, ids))


def test_kept_blocks_serve_greedy_like_transformers(tmp_path, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    file = _file("llama", "Q4_1", tmp_path, tmp_path_factory)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32).eval()
    llm = LLM(str(file), quantization="gguf", max_model_len=64, page_size=8)
    batch = prompts()
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt)[:8]


def test_gguf_quantization_is_refused_where_it_cannot_apply(tiny_checkpoint, tmp_path, tmp_path_factory):
    with pytest.raises(ValueError, match="no .gguf file"):
        model_lib.from_pretrained(tiny_checkpoint("llama-gqa")[0], quantization="gguf")
    with pytest.raises(ValueError, match="gguf quantization with a mesh is not supported"):
        model_lib.from_pretrained(_file("llama", "Q8_0", tmp_path, tmp_path_factory), quantization="gguf", mesh="tp")
