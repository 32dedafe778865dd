"""GGUF checkpoints (llama.cpp, Ollama): one file holding the config, the tokenizer and the tensors.

The config is what transformers rebuilds from the file's metadata
(`AutoConfig.from_pretrained(folder, gguf_file=name)`), so a key means what it means
there. Tensors are read with the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`:
every ggml block type it knows, Q4_0 ... Q6_K, F16, BF16, F32), renamed from llama.cpp's
names to the Hugging Face ones with `gguf`'s own `TensorNameMap`, and brought back to the
Hugging Face layout by undoing what llama.cpp's converter did to them (the rotary
permutation of Llama's q/k, BLOOM's regrouped query_key_value, GPT-2's
transposed Conv1D weights, Gemma's and Nemotron's `w + 1` norms, stacked MoE experts).
From there the ordinary checkpoint path (`checkpoint.load_params`) takes over.

With `keep_blocks` (`quantization="gguf"`), Q4_0, Q4_1 and Q8_0 tensors are not dequantized: they
come out as their blocks (`model_lib.quantization.gguf_blocks.HostGGUFBlocks`), which the loader
keeps quantized for linear kernels and expert stacks. llama.cpp's transforms that only move rows
(the rotary permutation, BLOOM's regrouping) commute with blocks that run along the rows, so they
are applied to the blocks; a tensor whose transform is no row permutation (GPT-2's transposed
weights), and every other type (K-quants, Q5_0/Q5_1, F16, BF16, F32), is dequantized as before.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.registry import Family, get_family

GGUF_SUFFIX = ".gguf"
# A per-expert HF module (`mlp.experts.3.gate_proj`) and the stacked name gguf maps (`mlp.experts.gate_proj`).
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def is_gguf_file(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == GGUF_SUFFIX and path.is_file()


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int) -> tuple[Any, dict[str, Any]]:
    """The file's `GGUFReader` and its metadata as Python values, parsed once per file version."""
    from gguf import GGUFReader

    from model_lib.checkpoint import CheckpointError

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    return reader, {key: field.contents() for key, field in reader.fields.items()}


def open_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    path = Path(path).resolve()
    return _open(str(path), path.stat().st_mtime_ns)


def gguf_config_dict(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The config dict transformers' `load_gguf_checkpoint(path, return_tensors=False)` builds.

    Rebuilt from transformers' own key tables because its GGUF readers import torch, which
    serving does not install; tests/model_lib/test_gguf.py checks the two agree.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    from model_lib.checkpoint import CheckpointError

    arch = metadata["general.architecture"]
    # transformers tests list membership, so only a file named exactly "mistral" becomes Mistral.
    renamed = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}.get(arch, arch)
    if arch == "llama" and metadata.get("general.name") == "mistral":
        renamed = "mistral"
    if renamed not in GGUF_CONFIG_MAPPING:
        raise CheckpointError(f"GGUF architecture {arch!r} is not one transformers reads")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names or arch in ("falcon", "bloom")}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(renamed, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        config.setdefault(key, value)
    for key, value in metadata.items():
        prefix, _, rest = key.replace(arch, renamed).partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is not None and target != -1:
            config[target] = value.replace(arch, renamed) if isinstance(value, str) and arch in value else value
    if config["model_type"] == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def load_hf_config(path: str | Path) -> Any:
    """The transformers config of a GGUF file, as `AutoConfig.from_pretrained(..., gguf_file=)` makes it."""
    from transformers import CONFIG_MAPPING

    from model_lib.checkpoint import CheckpointError

    reader, metadata = open_gguf(path)
    config = gguf_config_dict(metadata, {t.name for t in reader.tensors})
    if config["model_type"] not in CONFIG_MAPPING:
        raise CheckpointError(f"GGUF model_type {config['model_type']!r} has no transformers config class")
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def causal_lm_architecture(hf: Any) -> str:
    """The class `AutoModelForCausalLM` builds for this config (a GGUF names no `architectures`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from model_lib.checkpoint import CheckpointError

    if hf.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"GGUF model_type {hf.model_type!r} has no causal-LM class in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf.model_type]


def load_gguf_config(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, Family]:
    """`ModelConfig` and family of a GGUF file; dequantized weights default to float32 (as in transformers)."""
    from model_lib.checkpoint import resolve_dtype

    hf = load_hf_config(path)
    architecture = causal_lm_architecture(hf)
    family = get_family(architecture)
    config = family.config_from_hf(hf, architecture)
    return config.replace(dtype=resolve_dtype(dtype, {})), family.for_config(config)


# --- llama.cpp's tensor transforms, undone. Each takes (array, GGUF tensor name, config). ---


def _unpermute_rotary(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves each Llama q/k head's rotary halves; put them back as halves."""
    w = array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:])
    return w.swapaxes(1, 2).reshape(array.shape)


def _llama_qk(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    if ".attn_q." in name:
        return _unpermute_rotary(array, config.num_heads)
    if ".attn_k." in name:
        return _unpermute_rotary(array, config.num_kv_heads)
    return array


def _bloom_qkv(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp concatenates BLOOM's per-head [q, k, v] rows into [Q; K; V]; interleave them again."""
    if ".attn_qkv." not in name:
        return array
    q, k, v = (part.reshape(config.num_heads, config.head_dim, *array.shape[1:]) for part in np.split(array, 3))
    return np.stack([q, k, v], axis=1).reshape(array.shape)


_GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _gpt2_conv1d(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp stores GPT-2's Conv1D weights `[out, in]`; HF keeps them `[in, out]`."""
    return array.T if name.endswith(_GPT2_CONV1D) else array


def _norm_minus_one(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp stores Gemma's (1 + w) RMSNorm and Nemotron's LayerNorm1p weights as w + 1."""
    return array - 1 if name.endswith("norm.weight") else array


def _shared_expert_gate(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp squeezes Qwen2-MoE's `[1, hidden]` shared-expert gate to `[hidden]`."""
    return array.reshape(1, -1) if ".ffn_gate_inp_shexp." in name else array


# GGUF `general.architecture` -> the transforms its converter applied.
UNDO: dict[str, tuple[Callable[[np.ndarray, str, ModelConfig], np.ndarray], ...]] = {
    "llama": (_llama_qk,),
    "bloom": (_bloom_qkv,),
    "gpt2": (_gpt2_conv1d,),
    "gemma2": (_norm_minus_one,),
    "gemma3": (_norm_minus_one,),
    "nemotron": (_norm_minus_one,),
    "qwen2moe": (_shared_expert_gate,),
}


def hf_tensor_names(expected: dict[str, nnx.Variable], family: Family) -> set[str]:
    """The HF tensor names of a safetensors checkpoint holding exactly these parameters."""
    from model_lib.checkpoint import _hf_name

    names = set()
    for key, variable in expected.items():
        module = key.rpartition(".")[0]
        if family.weight_map.stacked_for_ours(module) is not None:
            names.update(_hf_name(key, family, e) for e in range(variable.shape[0]))
        else:
            names.add(_hf_name(key, family))
    return names


def gguf_to_hf_names(arch: str, num_layers: int, hf_names: set[str], bare_prefix: str) -> dict[str, str]:
    """GGUF tensor name -> HF tensor name, by gguf's `TensorNameMap` (expert names keep `{e}` open)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    from model_lib.checkpoint import CheckpointError

    gguf_arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch), None)
    if gguf_arch is None:
        raise CheckpointError(f"the gguf package knows no architecture {arch!r}")
    name_map = get_tensor_name_map(gguf_arch, num_layers)
    mapping: dict[str, str] = {}
    for hf_name in sorted(hf_names):
        module, _, leaf = hf_name.rpartition(".")
        stacked = _EXPERT.sub(".experts.", module)
        candidates = [stacked] + ([stacked.removeprefix(bare_prefix)] if bare_prefix else [])
        gguf_module = next((g for c in candidates if (g := name_map.get_name(c)) is not None), None)
        if gguf_module is not None:
            mapping[f"{gguf_module}.{leaf}"] = _EXPERT.sub(".experts.{e}.", hf_name)
    return mapping


def _row_order(undo: tuple[Callable[[np.ndarray, str, ModelConfig], np.ndarray], ...], name: str,
               rows: tuple[int, ...], config: ModelConfig) -> np.ndarray | None:
    """The row permutation `undo` applies to a tensor with `rows` leading dims, or None if it does more."""
    index = np.arange(int(np.prod(rows))).reshape(*rows, 1)
    moved = index
    for step in undo:
        moved = step(moved, name, config)
    if moved.shape != index.shape or not np.array_equal(np.sort(moved.reshape(-1)), index.reshape(-1)):
        return None
    return moved.reshape(-1)


def _kept_blocks(tensor: Any, undo, config: ModelConfig) -> np.ndarray | None:
    """A Q4_0 / Q4_1 / Q8_0 tensor's raw blocks `[..., out, bytes]` with llama.cpp's row moves undone, or None."""
    from model_lib.quantization.gguf_blocks import BLOCK_TYPES

    data = np.asarray(tensor.data)
    if tensor.tensor_type.name not in BLOCK_TYPES or data.ndim < 2:
        return None
    order = _row_order(undo, tensor.name, data.shape[:-1], config)
    if order is None:
        return None
    return data.reshape(-1, data.shape[-1])[order].reshape(data.shape)


def iter_gguf_tensors(
    path: Path, family: Family, config: ModelConfig, expected: dict[str, nnx.Variable], keep_blocks: bool = False
) -> Iterator[tuple[Path, str, Any]]:
    """(file, HF name, float32 array in the HF layout) for every tensor of the GGUF file, one at a time.

    Stacked expert tensors `[X, out, in]` come out as X per-expert tensors. A tensor gguf's
    name map cannot place comes out under its GGUF name, which the loader reports as unexpected.
    With `keep_blocks`, Q4_0 / Q4_1 / Q8_0 tensors come out as `HostGGUFBlocks` (module docstring).
    """
    from model_lib.quantization.gguf_blocks import HostGGUFBlocks

    from gguf.quants import dequantize

    from model_lib.checkpoint import CheckpointError

    reader, metadata = open_gguf(path)
    arch = metadata["general.architecture"]
    undo = UNDO.get(arch, ())
    # `lm_head` too when tied: Falcon and BLOOM files may carry an `output.weight` that transformers
    # ignores (it ties them whatever the file holds), and the loader skips a tied head by this name.
    hf_names = hf_tensor_names(expected, family) | {"lm_head.weight"}
    names = gguf_to_hf_names(arch, config.num_layers, hf_names, family.weight_map.bare_prefix)
    for tensor in reader.tensors:
        blocks = _kept_blocks(tensor, undo, config) if keep_blocks else None
        if blocks is not None:
            array = [HostGGUFBlocks(tensor.tensor_type.name, b) for b in blocks] if blocks.ndim == 3 else \
                HostGGUFBlocks(tensor.tensor_type.name, blocks)
        else:
            try:
                array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            except (NotImplementedError, ValueError) as e:
                raise CheckpointError(f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}) in {path}: "
                                      f"{e}") from None
            for step in undo:
                array = step(array, tensor.name, config)
        hf_name = names.get(tensor.name, tensor.name)
        if "{e}" in hf_name:
            for expert, piece in enumerate(array):
                yield path, hf_name.replace("{e}", str(expert)), piece
        else:
            yield path, hf_name, array


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer and chat template transformers builds from the file (`AutoTokenizer`, `gguf_file=`), or None.

    Its steps (transformers' `get_gguf_tokenizer` then `convert_gguf_tokenizer`) on metadata
    read with `gguf`, since transformers' own reader imports torch.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    _, metadata = open_gguf(path)
    if "tokenizer.ggml.tokens" not in metadata:
        return None
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece files that say nothing
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

