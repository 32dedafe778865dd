"""LoRA adapters on the shared `Linear`, PEFT import/export, merging, and NF4 / int8 quantization of a model.

Targets are named as PEFT names them, against the Hugging Face module paths:
a list of names matches modules whose path ends with one of them (`q_proj`), a
string is a regex that must match the whole path, and `all-linear` takes every
linear layer but the output head. Where we split a fused HF module (Phi-3's
`qkv_proj`), its parts share one `A` and each holds its rows of `B`, which is
exactly PEFT's single adapter on the fused module, so adapters move between
this project, PEFT and vLLM unchanged. MoE expert stacks are adapted through
`target_parameters`, as PEFT names transformers 5's fused expert parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; `model_lib/expert_lora.py`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from model_lib import expert_lora
from model_lib.layers.embedding import Embed
from model_lib.layers.linear import Linear, LoRAParam
from model_lib.layers.moe import expert_layers
from model_lib.quantization import quantize_fp8, quantize_int4, quantize_int8, quantize_nf4
from model_lib.quantization.stacked import StackedWeight
from model_lib.registry import Family, get_family
from model_lib.sharding import ShardingPlan, shard_quantized

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUTPUT_HEAD = "lm_head"


@dataclass
class LoraConfig:
    """PEFT's LoRA fields (the ones that change the math, plus bookkeeping)."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    # MoE expert parameters as PEFT names them in transformers 5 (`mlp.experts.gate_up_proj`).
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.target_parameters is not None and not isinstance(self.target_parameters, list):
            raise ValueError(f"target_parameters must be a list of names, got {self.target_parameters!r}")
        if not self.target_modules and not self.target_parameters:
            raise ValueError("LoRA needs target_modules or target_parameters")
        if self.target_parameters and self.lora_dropout > 0:
            # PEFT's ParamWrapper cannot apply dropout to x before a parameter's adapter, and refuses it.
            raise ValueError(f"LoRA on target_parameters needs lora_dropout 0 (as in PEFT), got {self.lora_dropout}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self, base_model_name_or_path: str) -> dict[str, Any]:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "target_parameters": self.target_parameters,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "modules_to_save": None,
            "init_lora_weights": True,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> "LoraConfig":
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}")
        unsupported = {
            key: config[key]
            for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
            if config.get(key)
        }
        if config.get("bias", "none") != "none":
            unsupported["bias"] = config["bias"]
        if unsupported:
            raise ValueError(f"unsupported LoRA adapter settings: {unsupported}")
        targets = config.get("target_modules") or []
        parameters = config.get("target_parameters")
        return cls(
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0),
            target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
            use_rslora=config.get("use_rslora", False),
            target_parameters=sorted(parameters) if parameters else None,
        )


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
    """Our path ('model.layers.0.self_attn.q_proj') -> Linear, for every linear layer."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}


def _hf_module(path: str, family: Family) -> str:
    """The HF module path PEFT names (inside a multimodal checkpoint: under its `nested_prefix`)."""
    fused = family.weight_map.fused_for_ours(path)
    return family.weight_map.nested(fused[1] if fused else family.weight_map.module_to_hf(path))


def is_output_head(path: str) -> bool:
    """Our path of a model's output layer (`lm_head`, also under a multimodal prefix)."""
    return path == OUTPUT_HEAD or path.endswith("." + OUTPUT_HEAD)


def _matches(path: str, hf_module: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":  # as PEFT's: every linear layer but the output one, whatever its HF name
        return not is_output_head(path)
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_module) is not None
    return any(hf_module == t or hf_module.endswith("." + t) for t in targets)


# Modules of a vision-language model outside its language model: only a regex target reaches them
# (names such as "q_proj" or "all-linear" adapt the language model, the vision side stays frozen). Llama 4 and
# Mllama name their tower `vision_model`; Mllama's projector is one linear layer; Qwen-VL's tower and merger are
# `visual`.
VISION_MODULES = ("vision_tower", "vision_model", "multi_modal_projector", "visual")


def _vision_side_left_out(path: str, targets: list[str] | str) -> bool:
    """Whether names or "all-linear" (not a regex) leave our linear layer at `path` out: it is on the vision side."""
    by_regex = isinstance(targets, str) and targets != "all-linear"
    return not by_regex and path.split(".", 1)[0] in VISION_MODULES


def target_groups(model: nnx.Module, targets: list[str] | str) -> dict[str, list[tuple[str, Linear]]]:
    """HF module path -> our linear layers that hold it (one, or the parts of a fused module)."""
    family = get_family(model.config.architecture).for_config(model.config)
    groups: dict[str, list[tuple[str, Linear]]] = {}
    order: dict[str, int] = {}  # fused parts in the HF tensor's order (q, k, v), not graph order
    for path, layer in linear_layers(model).items():
        if _vision_side_left_out(path, targets):
            continue
        hf = _hf_module(path, family)
        if _matches(path, hf, targets):
            groups.setdefault(hf, []).append((path, layer))
            fused = family.weight_map.fused_for_ours(path)
            order[path] = fused[2].index(path) if fused else 0
    for parts in groups.values():
        parts.sort(key=lambda item: order[item[0]])
    if not groups and targets:
        names = sorted({_hf_module(p, family).rsplit(".", 1)[-1] for p in linear_layers(model)})
        raise ValueError(f"target_modules {targets!r} match no linear layer; this model has: {', '.join(names)}")
    return groups


def apply_lora(model: nnx.Module, config: LoraConfig, *, seed: int = 0) -> dict[str, list[tuple[str, Linear]]]:
    """Attach fresh adapters (A Kaiming-uniform as in PEFT, B zero) to the targeted layers, in place."""
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    groups = target_groups(model, config.target_modules)
    dropout = nnx.Dropout(config.lora_dropout, rngs=rngs) if config.lora_dropout > 0 else None
    for _, parts in groups.items():
        first = parts[0][1]
        dtype = jnp.float32  # adapters train in float32 whatever the base dtype
        bound = 1.0 / math.sqrt(first.in_features)
        a = LoRAParam(
            jax.random.uniform(rngs.params(), (first.in_features, config.r), jnp.float32, -bound, bound).astype(dtype),
            logical_axes=(first.axes[0], None),
            head_size=first.head_size,
        )
        for _, layer in parts:
            layer.lora_a = a  # shared by the parts of a fused module
            layer.lora_b = LoRAParam(
                jnp.zeros((config.r, layer.out_features), dtype), logical_axes=(None, layer.axes[1]), head_size=layer.head_size
            )
            layer.lora_scale = config.scale
            layer.lora_dropout = dropout
    if config.target_parameters:
        expert_lora.attach(expert_lora.expert_targets(model, config.target_parameters), config.r, config.scale, rngs)
    return groups


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its base kernel and remove it (in place)."""
    for layer in linear_layers(model).values():
        if layer.lora_a is None:
            continue
        if layer.quantized is not None:
            raise ValueError("cannot merge into quantized weights; load the base model unquantized to merge")
        kernel = layer.kernel[...]
        delta = jnp.dot(layer.lora_a[...].astype(jnp.float32), layer.lora_b[...].astype(jnp.float32)) * layer.lora_scale
        layer.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        layer.lora_a = layer.lora_b = layer.lora_dropout = None
        layer.lora_scale = 0.0
    for stack in expert_layers(model).values():
        if stack.lora_a is not None:
            if stack.quantized is not None:
                raise ValueError("cannot merge into quantized experts; load the base model unquantized to merge")
            expert_lora.merge(stack)


def _fused_spec(model: nnx.Module, path: str):
    """The fused-module spec that `path` is a part of (its B rows follow that layout), or None."""
    fused = get_family(model.config.architecture).for_config(model.config).weight_map.fused_for_ours(path)
    return fused[0] if fused else None


def _peft_key(hf_module: str, which: str) -> str:
    return f"base_model.model.{hf_module}.lora_{which}.weight"


def save_peft_adapter(model: nnx.Module, config: LoraConfig, path: str | Path, base_model_name_or_path: str) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    groups = target_groups(model, config.target_modules)
    for hf_module, parts in groups.items():
        layers = [layer for _, layer in parts]
        if any(layer.lora_a is None for layer in layers):
            raise ValueError(f"{hf_module} has no adapter; was apply_lora called with this config?")
        tensors[_peft_key(hf_module, "A")] = np.asarray(jax.device_get(layers[0].lora_a[...]), np.float32).T
        b_parts = [np.asarray(jax.device_get(layer.lora_b[...]), np.float32).T for layer in layers]
        fused = _fused_spec(model, parts[0][0])
        tensors[_peft_key(hf_module, "B")] = fused.join(b_parts, model.config) if fused else b_parts[0]
    if config.target_parameters:
        groups = expert_lora.expert_targets(model, config.target_parameters)
        for hf_param, prefix in expert_lora.peft_keys(groups).items():
            stacks = [stack for _, stack in groups[hf_param]]
            if any(stack.lora_a is None for stack in stacks):
                raise ValueError(f"{hf_param} has no adapter; was apply_lora called with this config?")
            a = np.asarray(jax.device_get(stacks[0].lora_a[...]), np.float32)
            b_parts = [np.asarray(jax.device_get(stack.lora_b[...]), np.float32) for stack in stacks]
            tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"] = expert_lora.to_peft(
                a, b_parts, expert_lora.peft_layout(model))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = config.to_peft(base_model_name_or_path)
    if config.target_modules and any(_vision_side_left_out(p, config.target_modules) for p in linear_layers(model)):
        # PEFT reads names and "all-linear" as the vision tower's layers too: name the adapted modules themselves.
        peft_config["target_modules"] = sorted(groups)
    (path / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))


def read_peft_adapter(model: nnx.Module, path: str | Path) -> tuple[LoraConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A PEFT LoRA adapter folder read against `model`'s layers, without touching them.

    Returns its config and, per targeted linear layer (our path), `A [in, r]` and `B [r, out]` in
    float32 (a fused HF module's B split into its parts, which share A); per targeted expert stack,
    `A [X, in, r]` and `B [X, r, out]`. Missing files, missing or
    wrongly shaped tensors, tensors for modules the config does not target, and targets this model
    has no linear layer for are errors naming them.
    """
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in adapter folder {path}")
    config = LoraConfig.from_peft(json.loads(config_file.read_text()))
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {path}")
    tensors = load_file(weights_file)
    # PEFT may keep the adapter name in the key ('lora_A.default.weight').
    tensors = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k): v for k, v in tensors.items()}
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    used = set()
    for hf_module, parts in target_groups(model, config.target_modules).items():
        a_key, b_key = _peft_key(hf_module, "A"), _peft_key(hf_module, "B")
        if a_key not in tensors or b_key not in tensors:
            raise ValueError(f"adapter {weights_file} lacks {a_key if a_key not in tensors else b_key}")
        a, b = np.asarray(tensors[a_key], np.float32), np.asarray(tensors[b_key], np.float32)
        layers = [layer for _, layer in parts]
        expected_b = (sum(layer.out_features for layer in layers), config.r)
        if a.shape != (config.r, layers[0].in_features) or b.shape != expected_b:
            raise ValueError(
                f"adapter tensors of {hf_module} have shapes {a.shape} / {b.shape}, "
                f"expected {(config.r, layers[0].in_features)} / {expected_b}"
            )
        fused = _fused_spec(model, parts[0][0])
        for (layer_path, _), b_part in zip(parts, fused.split(b, model.config) if fused else [b]):
            weights[layer_path] = (a.T, np.asarray(b_part).T)
        used.update((a_key, b_key))
    if config.target_parameters:
        groups = expert_lora.expert_targets(model, config.target_parameters)
        for hf_param, prefix in expert_lora.peft_keys(groups).items():
            a_key, b_key = prefix + "lora_A.weight", prefix + "lora_B.weight"
            if a_key not in tensors or b_key not in tensors:
                raise ValueError(f"adapter {weights_file} lacks {a_key if a_key not in tensors else b_key}")
            a, b = np.asarray(tensors[a_key], np.float32), np.asarray(tensors[b_key], np.float32)
            parts = groups[hf_param]
            layout = expert_lora.peft_layout(model)
            expected_a, expected_b = expert_lora.expected_shapes(parts, config.r, layout)
            if a.shape != expected_a or b.shape != expected_b:
                raise ValueError(f"adapter tensors of {hf_param} have shapes {a.shape} / {b.shape}, "
                                 f"expected {expected_a} / {expected_b}")
            a_ours, b_parts = expert_lora.from_peft(a, b, parts[0][1].num_experts, len(parts), layout)
            for (stack_path, _), b_part in zip(parts, b_parts):
                weights[stack_path] = (a_ours, b_part)
            used.update((a_key, b_key))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"adapter {weights_file} has tensors for modules its config does not target: {unused[:4]}")
    return config, weights


def load_peft_adapter(model: nnx.Module, path: str | Path) -> LoraConfig:
    """Attach a PEFT LoRA adapter from a folder (in place); returns its config."""
    config, weights = read_peft_adapter(model, path)
    apply_lora(model, config)
    layers = {**linear_layers(model), **expert_layers(model)}
    for layer_path, (a, b) in weights.items():
        layer = layers[layer_path]
        dtype = layer.lora_a[...].dtype
        layer.lora_a.set_value(jnp.asarray(a, dtype))  # the parts of a fused module share A (set alike)
        layer.lora_b.set_value(jnp.asarray(b, dtype))
    return config


def quantization_targets(model: nnx.Module, *, embeddings: bool = False) -> dict[str, Linear | Embed]:
    """Parameter key -> the layer whose weight is stored quantized (NF4 under QLoRA, or int8).

    Every linear kernel but the output head, as bitsandbytes does; with `embeddings`, also the
    token embedding and the output head (an untied model's largest frozen tables).
    """
    targets: dict[str, Linear | Embed] = {
        f"{path}.kernel": layer
        for path, layer in linear_layers(model).items()
        if (embeddings or path != OUTPUT_HEAD) and layer.kernel is not None
    }
    embed = getattr(model.model, "embed_tokens", None)
    if embeddings and isinstance(embed, Embed) and not model.config.tie_word_embeddings and embed.weight is not None:
        targets["model.embed_tokens.weight"] = embed
    return targets


def quantize_model_nf4(model: nnx.Module, *, embeddings: bool = False) -> None:
    """Replace the `quantization_targets` of a model already in memory by their NF4 form, in place.

    `from_pretrained(..., quantization="nf4")` quantizes while loading instead.
    """
    for key, layer in quantization_targets(model, embeddings=embeddings).items():
        leaf = key.rsplit(".", 1)[1]
        value = np.asarray(jax.device_get(getattr(layer, leaf)[...]))
        layer.quantized = quantize_nf4(value, axes=layer.axes, head_size=getattr(layer, "head_size", 1))
        setattr(layer, leaf, None)


# Formats quantized from a model in memory (linear kernels but the output head): weight-only int8 and
# int4, and FP8 with per-channel scales (W8A8: activations are quantized too, per token).
WEIGHT_ONLY = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


def quantize_model_weight_only(model: nnx.Module, method: str, plan: ShardingPlan | None = None) -> None:
    """Replace the `quantization_targets` and the MoE expert stacks by their `method` form ("int8", "int4"
    or "fp8"; each expert quantized alone), in place; with a `plan`, each quantized weight is placed on
    its mesh as it is made (a split that cuts a group is refused; quantized expert stacks do not shard yet)."""
    experts = {path: layer for path, layer in expert_layers(model).items() if layer.kernel is not None}
    if experts and plan is not None:
        raise ValueError(f"{method} quantization of MoE experts on a mesh is not supported yet "
                         f"(quantized expert stacks are not sharded): {next(iter(experts))}")
    quantize = WEIGHT_ONLY[method]
    for path, layer in quantization_targets(model).items():
        kernel = np.asarray(jax.device_get(layer.kernel[...]), np.float32)
        weight = quantize(kernel, axes=layer.axes, head_size=layer.head_size)
        layer.quantized = weight if plan is None else shard_quantized(weight, plan, path)
        layer.kernel = None
    for layer in experts.values():
        kernels = np.asarray(jax.device_get(layer.kernel[...]), np.float32)
        layer.quantized = StackedWeight([quantize(kernel) for kernel in kernels])
        layer.kernel = None


def param_bytes(model: nnx.Module) -> int:
    """Bytes held by parameters and quantized weights (not RNG state)."""
    _, state = nnx.split(model)
    total = 0
    for _, variable in nnx.to_flat_state(state):
        if isinstance(variable, nnx.RngState):
            continue
        value = variable.get_value()
        total += int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize
    return total


__all__ = [
    "LoraConfig",
    "apply_lora",
    "load_peft_adapter",
    "read_peft_adapter",
    "merge_lora",
    "quantization_targets",
    "param_bytes",
    "quantize_model_nf4",
    "quantize_model_weight_only",
    "save_peft_adapter",
    "target_groups",
]
