"""`from_pretrained`: checkpoint folder -> model, and building a model from a config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from model_lib.checkpoint import abstract_params, load_config, load_params, read_config_json
from model_lib.config import ModelConfig
from model_lib.decoder import CausalLM
from model_lib.gguf import is_gguf_file
from model_lib.layers.moe import expert_layers
from model_lib.lora import WEIGHT_ONLY, linear_layers, quantization_targets, quantize_model_weight_only
from model_lib.quantization import QuantizedWeight
from model_lib.quantization.checkpoints import METHODS as CHECKPOINT_METHODS
from model_lib.quantization.checkpoints import Scheme, scheme_for
from model_lib.sharding import ShardingPlan, as_plan, shard_model


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The module class of `config`: a vision-language wrapper when it has a vision tower."""
    if config.multimodal is not None:
        from model_lib.vision.models import vision_model_class

        return vision_model_class(config.architecture)
    return CausalLM


def from_config(config: ModelConfig, *, seed: int = 0, mesh: Mesh | ShardingPlan | str | None = None) -> CausalLM:
    """A randomly initialised model (for training from scratch and tests)."""
    model = model_class(config)(config, rngs=nnx.Rngs(seed))
    plan = as_plan(mesh)
    return shard_model(model, plan) if plan is not None else model


# nf4: linear kernels but the output head; nf4-embeddings: also the token embedding and output head;
# int8 / int4: weight-only int8 / int4 (group 128) of the same kernels as nf4; fp8: W8A8 FP8 (per channel).
QUANTIZATIONS = ("nf4", "nf4-embeddings", *WEIGHT_ONLY)
# A GGUF file's Q4_0 / Q4_1 / Q8_0 blocks kept quantized (vLLM's name).
GGUF = "gguf"
# Every name `from_pretrained(quantization=...)` takes: the above, GGUF's, and pre-quantized checkpoint methods.
ALL_QUANTIZATIONS = tuple(dict.fromkeys((*QUANTIZATIONS, GGUF, *CHECKPOINT_METHODS)))


def keeps_fp8(quantization: str | None) -> bool:
    """Whether an FP8 checkpoint's e4m3 weights stay FP8 (W8A8 compute): when `quantization="fp8"` asks
    for it, and by default on a CUDA backend; elsewhere they are dequantized on load."""
    return quantization == "fp8" or jax.default_backend() == "gpu"


def checkpoint_scheme(path: Path, quantization: str | None) -> Scheme | None:
    """The checkpoint's own quantization (from config.json), checked against the requested one."""
    if quantization not in (None, *ALL_QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(ALL_QUANTIZATIONS)}")
    if quantization == GGUF and not is_gguf_file(path):
        raise ValueError(f"quantization='gguf' keeps a GGUF file's blocks quantized, and {path} is no .gguf file")
    scheme = None if is_gguf_file(path) else scheme_for(read_config_json(path))
    if scheme is None and quantization in CHECKPOINT_METHODS and quantization not in WEIGHT_ONLY:
        raise ValueError(f"quantization={quantization!r} reads a pre-quantized checkpoint, and {path} has no "
                         "quantization_config")
    if scheme is not None and quantization not in (None, scheme.method, *(("fp8",) if scheme.fp8 else ())):
        raise ValueError(f"{path} is already quantized ({scheme.method}); omit quantization or pass "
                         f"{scheme.method!r}")
    return scheme if scheme is None or not scheme.fp8 else dataclasses.replace(scheme, keep_fp8=keeps_fp8(quantization))


def from_pretrained(
    path: str | Path,
    *,
    dtype: Any = None,
    mesh: Mesh | ShardingPlan | str | None = None,
    quantization: str | None = None,
) -> CausalLM:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) or a GGUF file.

    A GGUF file's quantized blocks are dequantized to `dtype` (default float32); with
    `quantization="gguf"` its Q4_0, Q4_1 and Q8_0 tensors stay in their blocks on the device
    (`model_lib.quantization.gguf_blocks`; linear kernels, the output head, MoE expert stacks and
    the token embedding, the rest of the model in `dtype`), other block types are dequantized.
    Without it the blocks are dequantized on every device: on a CPU the float32 model decodes
    5.4x faster than the kept blocks (benchmarks/RESULTS.md), which hold a fifth of its memory.
    `dtype`: float32, bfloat16 or float16 (default: the checkpoint's own).
    `mesh`: a `ShardingPlan`, a preset name from `configs/mesh/`, or a `Mesh`
    (default rules); each tensor is placed sharded as it is read (int8 / int4 / FP8 weights once
    quantized, with their scales; a mesh that cuts a group of inputs from its scales is refused).
    `quantization="nf4"`: every linear kernel but the output head is quantized on the
    host as it is read (QLoRA's base); only its NF4 form reaches the device. The
    result equals loading in `dtype` and calling `quantize_model_nf4`.
    `"nf4-embeddings"` also quantizes an untied model's token embedding and output head.
    `"int8"` keeps every linear kernel but the output head as weight-only int8 with
    per-output-channel scales; `"int4"` as weight-only int4 with a scale and zero point per
    128 input rows (64 or 32 where 128 does not divide the input width, else one group per column). Both are
    quantized after loading; MoE expert stacks are quantized too, each expert alone
    (`model_lib.quantization.stacked.StackedWeight`; not on a mesh yet). `"fp8"` on a float checkpoint keeps the
    same kernels as float8_e4m3fn with per-output-channel scales (dynamic FP8, as vLLM's) and
    multiplies them W8A8 (activations quantized per token; `model_lib.quantization.fp8`).
    A pre-quantized checkpoint (AWQ, GPTQ, compressed-tensors, FP8: a `quantization_config` in
    config.json) is detected and read as it is (`model_lib.quantization.checkpoints`): its int4 /
    int8 weights stay quantized on the device. Its FP8 (e4m3) linear weights stay FP8 (W8A8) with
    `quantization="fp8"` and by default on CUDA; elsewhere they are dequantized to `dtype`.
    `quantization` may then be omitted or name the checkpoint's method (or "fp8" for FP8 weights).
    """
    path = Path(path)
    scheme = checkpoint_scheme(path, quantization)
    if quantization == GGUF and mesh is not None:
        raise ValueError("gguf quantization with a mesh is not supported yet (GGUF blocks are not sharded)")
    config, family = load_config(path, dtype)
    plan = as_plan(mesh)
    if plan is not None:
        plan.check_heads(config)  # before any tensor is read
    abstract = nnx.eval_shape(lambda: model_class(config)(config, rngs=nnx.Rngs(0)))
    nf4 = quantization in ("nf4", "nf4-embeddings")
    targets = quantization_targets(abstract, embeddings=quantization == "nf4-embeddings") if nf4 else {}
    values = load_params(abstract, family, path, plan, quantize=frozenset(targets), scheme=scheme,
                         gguf_blocks=quantization == GGUF)
    layers = {**{f"{p}.kernel": layer for p, layer in {**linear_layers(abstract), **expert_layers(abstract)}.items()},
              "model.embed_tokens.weight": getattr(getattr(abstract, "model", None), "embed_tokens", None), **targets}
    for key in [k for k, v in values.items() if isinstance(v, QuantizedWeight)]:
        layer = layers.get(key)
        if layer is None:  # a kernel of no linear layer (an MoE router): the float weight it stands for
            values[key] = values[key].dequantize(abstract_params(abstract)[key].get_value().dtype)
            continue
        layer.quantized = values.pop(key)
        setattr(layer, key.rsplit(".", 1)[1], None)
    graphdef, state = nnx.split(abstract)
    filled = []
    for p, v in nnx.to_flat_state(state):
        key = ".".join(map(str, p))
        filled.append((p, v.replace(value=values[key]) if key in values else v))  # NF4 storage is already real
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    if quantization in WEIGHT_ONLY and scheme is None:
        quantize_model_weight_only(model, quantization, plan)
    return model


__all__ = ["abstract_params", "from_config", "from_pretrained"]
