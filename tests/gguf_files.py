"""Tiny GGUF files written at test time from tiny Hugging Face checkpoints, as llama.cpp's converter would.

`write_gguf` renames the checkpoint's tensors with gguf's `TensorNameMap`, applies the layout
changes llama.cpp makes (Llama's rotary q/k permutation, BLOOM's [Q; K; V] split, GPT-2's
`[out, in]` Conv1D weights, Gemma's and Nemotron's `w + 1` norms, stacked MoE experts,
Qwen2-MoE's squeezed shared-expert gate), writes the metadata keys transformers reads back
(the inverse of `transformers.integrations.ggml.GGUF_CONFIG_MAPPING`) and a byte-level BPE
tokenizer, and stores every 2-D tensor in the requested ggml type. Types the `gguf` package
cannot quantize (the K-quants) get valid random blocks: random bits with sane fp16 scales,
which both loaders then dequantize the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tests.tiny_models import CHAT_TEMPLATE, VOCAB

# transformers' config key -> the GGUF architecture name llama.cpp writes.
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "mistral": "llama"}
# llama.cpp converts Falcon-7B from its .bin files, which hold the tied lm_head: its GGUFs carry output.weight.
TIED_OUTPUT_WRITTEN = {"falcon"}
# K-quant block layouts: byte offsets of the fp16 scales in a block, and a scale that keeps weights ~0.02.
K_QUANT_SCALES = {
    "Q2_K": {80: 5e-4, 82: 1e-3},
    "Q3_K": {108: 1.5e-4},
    "Q4_K": {0: 2e-5, 2: 3e-4},
    "Q5_K": {0: 1e-5, 2: 3e-4},
    "Q6_K": {208: 5e-6},
}


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_llama_cpp(name: str, w: np.ndarray, arch: str, hf) -> np.ndarray:
    """What llama.cpp's converter does to one tensor, `name` being the GGUF name."""
    if arch == "llama" and ".attn_q." in name:
        return _permute_rotary(w, hf.num_attention_heads)
    if arch == "llama" and ".attn_k." in name:
        return _permute_rotary(w, hf.num_key_value_heads)
    if arch == "bloom" and ".attn_qkv." in name:
        heads = hf.n_head
        per_head = w.reshape(heads, 3, hf.hidden_size // heads, *w.shape[1:])
        return np.concatenate([per_head[:, i].reshape(-1, *w.shape[1:]) for i in range(3)])
    if arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
        return w.T
    if arch in ("gemma2", "gemma3", "nemotron") and name.endswith("norm.weight"):
        return w + 1
    if ".ffn_gate_inp_shexp." in name:
        return w.reshape(-1)
    return w


def _metadata_values(hf, arch_key: str) -> dict[str, object]:
    """`{gguf key suffix: value}` for the keys transformers maps to config attributes."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    values = {}
    for gguf_key, attr in GGUF_CONFIG_MAPPING[arch_key].items():
        if attr is None or attr == -1:
            continue
        if attr == "rope_theta":
            params = hf.rope_parameters or {}
            value = params.get("full_attention", params).get("rope_theta")
        else:
            value = getattr(hf, attr, None)
        if value is not None:
            values[gguf_key] = value
    return values


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _tokenizer_pieces() -> tuple[list[str], list[str]]:
    """The tiny character tokenizer as a byte-level BPE vocabulary (GPT-2's byte -> unicode map) and merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from tests.tiny_models import build_tokenizer

    byte_char = bytes_to_unicode()
    vocab = build_tokenizer().get_vocab()
    pieces = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens = [p if p.startswith("<") and len(p) > 1 else "".join(byte_char[b] for b in p.encode()) for p in pieces]
    merges = [f"{t[0]} {t[1:]}" for t in tokens[3:] if len(t) == 2]
    return tokens, merges


def _write_tokenizer(writer) -> None:
    tokens, merges = _tokenizer_pieces()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _random_k_blocks(shape: tuple[int, ...], qtype, rng: np.random.RandomState) -> np.ndarray:
    """Valid random blocks of a K-quant type: random bits, fp16 scales set to sane positive values."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    blocks = rng.randint(0, 256, size=(rows * cols // block, size)).astype(np.uint8)
    for offset, scale in K_QUANT_SCALES[qtype.name].items():
        d = (scale * rng.uniform(0.5, 1.5, size=len(blocks))).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], cols // block * size)


def _encode(w: np.ndarray, qtype, rng: np.random.RandomState) -> tuple[np.ndarray, object]:
    """(array to write, raw ggml type or None) for one tensor in the file's type; 1-D tensors stay F32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype.name in K_QUANT_SCALES:
        return _random_k_blocks(w.shape, qtype, rng), qtype
    return quantize(w.astype(np.float32), qtype), qtype


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert `...experts.{e}.x.weight` -> stacked `...experts.x.weight` `[X, out, in]`, as llama.cpp merges them."""
    stacked: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, w in tensors.items():
        if m := re.match(r"(.*\.experts)\.(\d+)\.(.*)$", name):
            stacked.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
        else:
            out[name] = w
    for name, pieces in stacked.items():
        out[name] = np.stack([pieces[e] for e in range(len(pieces))])
    return out


def write_gguf(folder: Path, hf, out: Path, qtype_name: str = "F32", name: str = "tiny", seed: int = 0) -> Path:
    """Convert the safetensors checkpoint in `folder` (config `hf`) into the GGUF file `out`."""
    import gguf
    from safetensors.numpy import load_file

    qtype = gguf.GGMLQuantizationType[qtype_name]
    arch = GGUF_ARCH.get(hf.model_type, hf.model_type)
    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(gguf_arch, hf.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    rng = np.random.RandomState(seed)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    arch_key = hf.model_type.replace("gemma3_text", "gemma3")
    for key, value in _metadata_values(hf, arch_key).items():
        _add(writer, f"{arch}.{key}", value)
    _write_tokenizer(writer)
    if hf.tie_word_embeddings and arch in TIED_OUTPUT_WRITTEN:
        embeddings = next(w for n, w in tensors.items() if n.endswith("word_embeddings.weight"))
        tensors["lm_head.weight"] = embeddings.copy()
    for hf_name, w in sorted(_stack_experts(tensors).items()):
        if hf.tie_word_embeddings and hf_name.startswith("lm_head.") and arch not in TIED_OUTPUT_WRITTEN:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) or name_map.get_name(
            hf_name.removeprefix("transformer."), try_suffixes=(".weight", ".bias")
        )
        if gguf_name is None:
            raise KeyError(f"gguf has no name for {hf_name!r} in {arch}")
        data, raw = _encode(_to_llama_cpp(gguf_name, w.astype(np.float32), arch, hf), qtype, rng)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
