"""LoRA on MoE expert stacks, in the layout PEFT's `target_parameters` gives them (PEFT >= 0.17).

transformers 5 holds a layer's experts as one module with fused parameters
`gate_up_proj [X, 2I, E]` (gate rows first) and `down_proj [X, E, I]`; PEFT adapts such
a parameter with a `ParamWrapper`: one rank-r pair per expert, stored flattened as
`lora_A.weight [X * r, in]` (expert-major rows) and `lora_B.weight [out, r * X]`
(rank-major columns), added to expert x's weight as `scale * B_x @ A_x`. We hold the
same adapter as `lora_a [X, in, r]` / `lora_b [X, r, out]` on each `ExpertLinear`;
`gate_up_proj`'s adapter is shared by our `gate_proj` and `up_proj` (one A, B split by rows).

Where a module has several targeted parameters PEFT nests the wrappers in the
module's parameter order, so the first one's keys gain a `base_layer.` per wrapper
outside it (`mlp.experts.base_layer.lora_A.weight` is `gate_up_proj`'s when `down_proj`
is targeted too). Families whose experts transformers 5 holds otherwise have no
`WeightMap.peft_experts` and are refused by name.

Two families hold the fused parameters `[X, in, out]` instead (`WeightMap.peft_experts_layout`):
- Llama 4 ("in_out", `feed_forward.experts`, gate then up columns): PEFT takes every 3-d
  parameter for `[X, out, in]` unless the module says `is_transposed`, which Llama 4's does not,
  so its `lora_A` acts on the OUTPUT side: `lora_A [X * r, out]` holds our B, `lora_B [in, r * X]`
  our A, and the delta still has the parameter's shape.
- gpt-oss ("in_out_interleaved"): its module is `is_transposed`, so the layout is the standard
  one above, but gate and up columns alternate in `gate_up_proj` (our B splits by stride).

Glossary: X experts, E hidden, I expert width, r rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.layers.linear import LoRAParam
from model_lib.layers.moe import ExpertLinear, expert_layers
from model_lib.registry import get_family
from model_lib.weight_map import WeightMap

# transformers 5's fused expert parameters, in module order, and our stacks that hold each.
HF_EXPERT_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _matches(key: str, targets: list[str]) -> bool:
    """PEFT's rule: the full parameter name, or a suffix of it after a dot."""
    return any(key == t or key.endswith("." + t) for t in targets)


def expert_targets(model: nnx.Module, targets: list[str]) -> dict[str, list[tuple[str, ExpertLinear]]]:
    """HF parameter name ('model.layers.1.mlp.experts.gate_up_proj') -> our stacks that hold it.

    An error names the family when PEFT cannot adapt its experts, and lists the parameter
    names when `targets` match none.
    """
    config = model.config
    weight_map = _weight_map(model)
    stacks = expert_layers(model)
    if not stacks:
        raise ValueError(f"target_parameters {targets!r}: {config.architecture} has no MoE expert stacks")
    if not weight_map.peft_experts:
        raise ValueError(
            f"target_parameters {targets!r}: LoRA on the MoE experts of {config.architecture} is not supported; "
            "transformers 5 does not hold them as fused gate_up_proj / down_proj parameters that PEFT can adapt"
        )
    groups: dict[str, list[tuple[str, ExpertLinear]]] = {}
    modules = sorted({path.rpartition(".")[0] for path in stacks}, key=_layer_order)
    for module in filter(weight_map.is_peft_experts, modules):  # not DeepSeek's MTP block (`mtp.0...`)
        hf_module = weight_map.peft_experts_module(module)
        for hf_param, parts in HF_EXPERT_PARAMS.items():
            if _matches(f"{hf_module}.{hf_param}", targets):
                groups[f"{hf_module}.{hf_param}"] = [(f"{module}.{p}", stacks[f"{module}.{p}"]) for p in parts]
    if not groups:
        parent = ".".join(weight_map.peft_experts_module(modules[0]).split(".")[-2:])
        names = ", ".join(f"{parent}.{p}" for p in HF_EXPERT_PARAMS)
        raise ValueError(f"target_parameters {targets!r} match no expert parameter; this model has: {names}")
    return groups


def _weight_map(model: nnx.Module) -> WeightMap:
    return get_family(model.config.architecture).for_config(model.config).weight_map


def peft_layout(model: nnx.Module) -> str:
    """How transformers 5 holds `model`'s fused expert parameters (`weight_map.PEFT_EXPERT_LAYOUTS`)."""
    return _weight_map(model).peft_experts_layout


def _layer_order(path: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in path.split("."))


def attach(groups: dict[str, list[tuple[str, ExpertLinear]]], r: int, scale: float, rngs: nnx.Rngs) -> None:
    """Fresh adapters (A Kaiming-uniform per expert as PEFT's, B zero) on every stack of `groups`, in place."""
    for parts in groups.values():
        first = parts[0][1]
        experts, fan_in = first.num_experts, _in_features(first)
        bound = 1.0 / math.sqrt(fan_in)
        axes = first.kernel.get_metadata()["logical_axes"] if first.kernel is not None else ("expert", None, None)
        a = LoRAParam(
            jax.random.uniform(rngs.params(), (experts, fan_in, r), jnp.float32, -bound, bound),
            logical_axes=(axes[0], axes[1], None),
        )
        for _, stack in parts:
            stack.lora_a = a  # gate and up share gate_up_proj's A
            stack.lora_b = LoRAParam(jnp.zeros((experts, r, _out_features(stack)), jnp.float32),
                                     logical_axes=(axes[0], None, axes[2]))
            stack.lora_scale = scale


def _in_features(stack: ExpertLinear) -> int:
    return (stack.kernel if stack.kernel is not None else stack.quantized).shape[1]


def _out_features(stack: ExpertLinear) -> int:
    return (stack.kernel if stack.kernel is not None else stack.quantized).shape[2]


def peft_keys(groups: dict[str, list[tuple[str, ExpertLinear]]]) -> dict[str, str]:
    """HF parameter name -> the module prefix of its PEFT tensors (`...experts.base_layer.` when nested)."""
    prefixes = {}
    for hf_param in groups:
        module, _, name = hf_param.rpartition(".")
        targeted = [p for p in HF_EXPERT_PARAMS if f"{module}.{p}" in groups]
        outer = len(targeted) - 1 - targeted.index(name)  # wrappers made after this one, around it
        prefixes[hf_param] = f"base_model.model.{module}." + "base_layer." * outer  # `module`: the HF path
    return prefixes


def _join_outputs(b_parts: list[np.ndarray], layout: str) -> np.ndarray:
    """The parts' `B [X, r, out_p]` as the HF parameter's output columns `[X, r, out]` (gate then up, or
    alternating)."""
    if layout == "in_out_interleaved":
        return np.stack(b_parts, axis=-1).reshape(*b_parts[0].shape[:-1], -1)
    return np.concatenate(b_parts, axis=-1)


def _split_outputs(b: np.ndarray, parts: int, layout: str) -> list[np.ndarray]:
    """Inverse of `_join_outputs`."""
    if layout == "in_out_interleaved":
        return [b[..., i::parts] for i in range(parts)]
    return np.split(b, parts, axis=-1)


def to_peft(a: np.ndarray, b_parts: list[np.ndarray], layout: str = "out_in") -> tuple[np.ndarray, np.ndarray]:
    """Our `A [X, in, r]` and the parts' `B [X, r, out_p]` -> PEFT's `lora_A`, `lora_B`: `[X*r, in]`, `[out, r*X]`
    (Llama 4's "in_out": `[X*r, out]`, `[in, r*X]`, A and B trading sides)."""
    b = _join_outputs(b_parts, layout)  # [X, r, out]
    experts, r, out = b.shape
    if layout == "in_out":
        return b.reshape(experts * r, out), a.transpose(1, 2, 0).reshape(a.shape[1], r * experts)
    return a.transpose(0, 2, 1).reshape(experts * r, -1), b.transpose(2, 1, 0).reshape(out, r * experts)


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int, parts: int,
              layout: str = "out_in") -> tuple[np.ndarray, list[np.ndarray]]:
    """Inverse of `to_peft`: `A [X, in, r]` and `parts` row blocks of B, each `[X, r, out / parts]`."""
    if layout == "in_out":
        a = lora_b.reshape(lora_b.shape[0], -1, experts).transpose(2, 0, 1)  # [X, in, r]
        b = lora_a.reshape(experts, -1, lora_a.shape[-1])  # [X, r, out]
    else:
        a = lora_a.reshape(experts, -1, lora_a.shape[-1]).transpose(0, 2, 1)
        b = lora_b.reshape(lora_b.shape[0], -1, experts).transpose(2, 1, 0)  # [X, r, out]
    return a, _split_outputs(b, parts, layout)


def expected_shapes(parts: list[tuple[str, ExpertLinear]], r: int,
                    layout: str = "out_in") -> tuple[tuple[int, int], tuple[int, int]]:
    """PEFT's `lora_A` / `lora_B` shapes for the HF parameter held by `parts`."""
    stack = parts[0][1]
    experts, out, fan_in = stack.num_experts, sum(_out_features(s) for _, s in parts), _in_features(stack)
    if layout == "in_out":
        return (experts * r, out), (fan_in, r * experts)
    return (experts * r, fan_in), (out, r * experts)


def merge(stack: ExpertLinear) -> None:
    """Fold `stack`'s adapter into its kernel and remove it (in place)."""
    kernel = stack.kernel[...]
    delta = jnp.einsum("xir,xro->xio", stack.lora_a[...].astype(jnp.float32), stack.lora_b[...].astype(jnp.float32))
    stack.kernel.set_value((kernel.astype(jnp.float32) + delta * stack.lora_scale).astype(kernel.dtype))
    stack.lora_a = stack.lora_b = None
    stack.lora_scale = 0.0
