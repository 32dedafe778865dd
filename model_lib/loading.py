"""`from_pretrained`: checkpoint folder -> model, and building a model from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from model_lib.checkpoint import abstract_params, load_config, load_params
from model_lib.config import ModelConfig
from model_lib.decoder import CausalLM
from model_lib.quantization import QUANTIZATIONS
from model_lib.sharding import ShardingPlan, as_plan, shard_model


def from_config(config: ModelConfig, *, seed: int = 0, mesh: Mesh | ShardingPlan | str | None = None) -> CausalLM:
    """A randomly initialised model (for training from scratch and tests)."""
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    plan = as_plan(mesh)
    return shard_model(model, plan) if plan is not None else model


def from_pretrained(
    path: str | Path,
    *,
    dtype: Any = None,
    mesh: Mesh | ShardingPlan | str | None = None,
    quantization: str | None = None,
) -> CausalLM:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) or a GGUF file.

    A GGUF file's quantized blocks are dequantized to `dtype` (default float32).
    `dtype`: float32, bfloat16 or float16 (default: the checkpoint's own).
    `mesh`: a `ShardingPlan`, a preset name from `configs/mesh/`, or a `Mesh`
    (default rules); each tensor is placed sharded as it is read.
    `quantization`: "int8" keeps every linear kernel but the LM head as weight-only int8 with
    per-output-channel scales (see `model_lib/quantization.py`); MoE experts stay in `dtype`.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    if quantization is not None and mesh is not None:
        raise ValueError("quantization with a mesh is not supported yet (quantized weights are not sharded)")
    path = Path(path)
    config, family = load_config(path, dtype)
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    values = load_params(abstract, family, path, as_plan(mesh))
    graphdef, state = nnx.split(abstract)
    filled = [(p, v.replace(value=values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    if quantization == "int8":
        from model_lib.lora import quantize_model_int8

        quantize_model_int8(model)
    return model


__all__ = ["abstract_params", "from_config", "from_pretrained"]
