"""GGUF checkpoints (llama.cpp, Ollama): one file holding the config, the tokenizer and the tensors.

The config is what transformers rebuilds from the file's metadata
(`AutoConfig.from_pretrained(folder, gguf_file=name)`), so a key means what it means
there. Tensors are read with the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`:
every ggml block type it knows, Q4_0 ... Q6_K, F16, BF16, F32), renamed from llama.cpp's
names to the Hugging Face ones with `gguf`'s own `TensorNameMap`, and brought back to the
Hugging Face layout by undoing what llama.cpp's converter did to them (the rotary
permutation of Llama's q/k, BLOOM's and Falcon's regrouped query_key_value, GPT-2's
transposed Conv1D weights, Gemma's and Nemotron's `w + 1` norms, stacked MoE experts).
From there the ordinary checkpoint path (`checkpoint.load_params`) takes over.
"""

from __future__ import annotations

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


def load_hf_config(path: Path) -> Any:
    """The transformers config that transformers itself builds from the file's metadata."""
    from transformers import AutoConfig

    from model_lib.checkpoint import CheckpointError

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"cannot read the config of GGUF file {path}: {e}") from None


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

    path = Path(path)
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


def _falcon_qkv(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp splits Falcon's per-KV-group [q..., k, v] rows into [Q; K; V]; group them again.

    With one KV head (Falcon-7B, multi-query) both orders are the same.
    """
    if not name.endswith(".attn_qkv.weight") or config.num_kv_heads == 1:
        return array
    groups, per_group, d = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    q_rows = config.num_heads * d
    q = array[:q_rows].reshape(groups, per_group * d, *array.shape[1:])
    k = array[q_rows : q_rows + groups * d].reshape(groups, d, *array.shape[1:])
    v = array[q_rows + groups * d :].reshape(groups, d, *array.shape[1:])
    return np.concatenate([q, k, v], axis=1).reshape(array.shape)


_GPT2_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _gpt2_conv1d(array: np.ndarray, name: str, config: ModelConfig) -> np.ndarray:
    """llama.cpp stores GPT-2's Conv1D weights `[out, in]`; HF keeps them `[in, out]`."""
    return array.T if name.endswith(_GPT2_CONV1D) and not name.startswith("output.") else array


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
    "falcon": (_falcon_qkv,),
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

    gguf_arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch), None)
    if gguf_arch is None:
        raise ValueError(f"the gguf package knows no architecture {arch!r}")
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


def iter_gguf_tensors(
    path: Path, family: Family, config: ModelConfig, expected: dict[str, nnx.Variable]
) -> Iterator[tuple[Path, str, np.ndarray]]:
    """(file, HF name, float32 array in the HF layout) for every tensor of the GGUF file, one at a time.

    Stacked expert tensors `[X, out, in]` come out as X per-expert tensors. A tensor gguf's
    name map cannot place comes out under its GGUF name, which the loader reports as unexpected.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from model_lib.checkpoint import CheckpointError

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    arch = str(reader.fields["general.architecture"].contents())
    undo = UNDO.get(arch, ())
    names = gguf_to_hf_names(arch, config.num_layers, hf_tensor_names(expected, family), family.weight_map.bare_prefix)
    for tensor in reader.tensors:
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}) in {path}: {e}") from None
        for step in undo:
            array = step(array, tensor.name, config)
        hf_name = names.get(tensor.name, tensor.name)
        if "{e}" in hf_name:
            for expert, piece in enumerate(array):
                yield path, hf_name.replace("{e}", str(expert)), piece
        else:
            yield path, hf_name, array


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer (with its chat template) transformers builds from the file's metadata, or None."""
    from transformers import AutoTokenizer

    from model_lib.checkpoint import CheckpointError

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except KeyError as e:  # no tokenizer.ggml.* metadata
        if "tokenizer" in str(e):
            return None
        raise CheckpointError(f"cannot build the tokenizer of GGUF file {path}: {e}") from None
