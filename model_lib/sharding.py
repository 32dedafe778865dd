"""Logical axis names -> mesh axes, resolved once through a rules table.

Every parameter carries `logical_axes` metadata (`("embed", "mlp")`); a
`ShardingPlan` pairs a device mesh (axes `data`, `fsdp`, `tensor`, `expert`) with
rules mapping each logical name to zero or more mesh axes. Presets live in
`configs/mesh/*.yaml`. Model code never names a mesh axis.

Attention heads are split whole. A projection's head dimension is flat (`heads x
head_dim`), so its parameters carry `head_size` metadata and divisibility is tested
on the head count, never on the flat size: query heads must divide over their mesh
axes; kv heads either divide or, when there are fewer of them than the tensor size
(and it is a multiple of them), stay replicated on every device, as vLLM does; any
other mesh is refused with an error that names the valid tensor sizes. The paged
KV cache `[K, ...]` follows the same rule. Other dimensions that the chosen mesh
axes do not divide are left replicated on those axes.

A jitted step on a mesh runs the kernels under `shard_map` through the same plan
(`model_lib/parallel.py`), and uses `replicated`, `rows_sharding` and `shardings_of`
for its explicit in/out shardings and block-boundary constraints.

Quantized weights (int8, int4, FP8, NF4) carry their kernel's axes on their storage and shard the
same way; a mesh that would cut an int4 / FP8 group of inputs from its scales is refused
(`GroupSplitError`, naming the valid sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "mesh"

# FSDP on the hidden dimension, tensor parallelism on heads, MLP and vocabulary.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
}


# Mesh axes that split a batch's rows (data parallelism, FSDP): the trainer's batches and residual stream.
DATA_AXES = ("data", "fsdp")

EXPERT_PARALLEL = ("psum", "all_to_all")

HEAD_AXES = ("q_heads", "kv_heads")
# Head axes whose heads may be replicated when there are fewer than devices.
REPLICABLE_HEAD_AXES = ("kv_heads",)


class HeadSplitError(ValueError):
    """A mesh that would cut an attention head or leave query heads indivisible."""


def head_split_ok(heads: int, size: int, *, replicable: bool) -> bool:
    """Whether `heads` whole heads fit `size` devices: an even split, or (kv heads) replication."""
    return heads % size == 0 or (replicable and heads < size and size % heads == 0)


def valid_tensor_sizes(num_heads: int, kv_heads: Iterable[int]) -> list[int]:
    """Tensor sizes that split `num_heads` query heads and every layer's kv heads whole."""
    kv = [k for k in kv_heads if k]
    return [
        t for t in range(1, num_heads + 1)
        if head_split_ok(num_heads, t, replicable=False) and all(head_split_ok(k, t, replicable=True) for k in kv)
    ]


def _as_axes(rule: str | Sequence[str] | None) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


@dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the rules that place every logical axis on it."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))
    # How an MoE layer splits over the expert axes (`model_lib/parallel.py`): "psum" or "all_to_all".
    expert_parallel: str = "psum"

    def __post_init__(self) -> None:
        if self.expert_parallel not in EXPERT_PARALLEL:
            raise ValueError(f"unknown expert_parallel {self.expert_parallel!r}; choose one of {EXPERT_PARALLEL}")

    def axis_size(self, name: str) -> int:
        """Devices that the rules spread logical axis `name` over."""
        return math.prod(self.mesh.shape[a] for a in _as_axes(self.rules.get(name)) if a in self.mesh.shape)

    def partition_spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int], head_size: int = 1
    ) -> PartitionSpec:
        """Mesh axes of every dimension; a head axis holds `size / head_size` heads, split whole."""
        used: set[str] = set()
        spec: list[tuple[str, ...] | None] = []
        for name, size in zip(logical_axes, shape):
            axes = [a for a in _as_axes(self.rules.get(name)) if a in self.mesh.shape and a not in used]
            if name in HEAD_AXES:
                axes = self._head_axes(name, size, head_size, axes)
            while axes and size % math.prod(self.mesh.shape[a] for a in axes):
                axes.pop()
            used.update(axes)
            spec.append(tuple(axes) if axes else None)
        return PartitionSpec(*spec)

    def _head_axes(self, name: str, size: int, head_size: int, axes: list[str]) -> list[str]:
        if size % head_size:
            raise ValueError(f"a {name} dimension of {size} is not a whole number of {head_size}-wide heads")
        heads, devices = size // head_size, math.prod(self.mesh.shape[a] for a in axes)
        if heads % devices == 0:
            return axes
        if head_split_ok(heads, devices, replicable=name in REPLICABLE_HEAD_AXES):
            return []  # fewer kv heads than devices: every device holds them all
        replicable = name in REPLICABLE_HEAD_AXES
        valid = [t for t in range(1, max(heads, self.mesh.size) + 1) if head_split_ok(heads, t, replicable=replicable)]
        raise HeadSplitError(
            f"{heads} {name} cannot be split whole over mesh axes {axes} of size {devices}; "
            f"valid sizes: {', '.join(map(str, valid))}"
        )

    def check_heads(self, config: Any) -> None:
        """Refuse a mesh that would split a head of `config` (a `ModelConfig`), naming the valid sizes."""
        kv = sorted({config.layer_cache_kv_heads(i) for i in range(config.num_layers)} - {0})
        if not kv:  # no attention layer (Mamba): no head to split
            return
        q_size, kv_size = self.axis_size("q_heads"), self.axis_size("kv_heads")
        if head_split_ok(config.num_heads, q_size, replicable=False) and all(
            head_split_ok(k, kv_size, replicable=True) for k in kv
        ):
            return
        raise HeadSplitError(
            f"{config.num_heads} query heads and {kv} kv heads cannot be split whole over a tensor size of "
            f"{q_size} (q_heads -> {self.rules.get('q_heads')}, kv_heads -> {self.rules.get('kv_heads')}); "
            f"valid tensor sizes: {', '.join(map(str, valid_tensor_sizes(config.num_heads, kv)))}"
        )

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int], head_size: int = 1) -> NamedSharding:
        return NamedSharding(self.mesh, self.partition_spec(logical_axes, shape, head_size))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def rows_sharding(self, leading: int = 0) -> NamedSharding:
        """Rows split over `DATA_AXES` after `leading` whole dimensions (a batch, the residual stream)."""
        return NamedSharding(self.mesh, PartitionSpec(*(None,) * leading, DATA_AXES))

    def variable_sharding(self, variable: nnx.Variable, shape: Sequence[int]) -> NamedSharding:
        """The sharding that a parameter's `logical_axes` (and `head_size`) metadata ask for."""
        metadata = variable.get_metadata()
        return self.sharding(metadata["logical_axes"], shape, metadata.get("head_size", 1))

    def place(
        self, array: np.ndarray, logical_axes: Sequence[str | None] | None = None, *, sharding: NamedSharding | None = None
    ) -> jax.Array:
        """Put a host array on the mesh, copying to each device only its own shard."""
        sharding = sharding if sharding is not None else self.sharding(logical_axes or (None,) * array.ndim, array.shape)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `MESH_AXES`; one size may be -1 (all remaining devices), missing axes are 1."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {axis_sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def mesh_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_mesh_preset(
    name_or_path: str | Path, devices: Sequence[jax.Device] | None = None, **axis_sizes: int
) -> ShardingPlan:
    """A `ShardingPlan` from `configs/mesh/<name>.yaml` (or a YAML path); sizes may be overridden."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"mesh preset {str(name_or_path)!r} not found; presets: {mesh_presets()}")
    preset: dict[str, Any] = yaml.safe_load(path.read_text())
    mesh = make_mesh({**preset.get("mesh", {}), **axis_sizes}, devices)
    rules = {name: _as_axes(rule) for name, rule in preset.get("rules", {}).items()}
    return ShardingPlan(mesh, rules, preset.get("expert_parallel", "psum"))


def as_plan(mesh: Mesh | ShardingPlan | str | None) -> ShardingPlan | None:
    """Accept a plan, a preset name, or a bare mesh (which gets `DEFAULT_RULES`)."""
    if mesh is None or isinstance(mesh, ShardingPlan):
        return mesh
    if isinstance(mesh, (str, Path)):
        return load_mesh_preset(mesh)
    if isinstance(mesh, Mesh):
        return ShardingPlan(mesh)
    raise TypeError(f"expected a Mesh, ShardingPlan or preset name, got {type(mesh).__name__}")


def shardings_of(tree: Any) -> Any:
    """Each array's sharding: the in/out shardings of a jitted step that keeps arrays where they are."""
    return jax.tree.map(lambda x: x.sharding, tree)


class GroupSplitError(ValueError):
    """A mesh that would cut a quantized weight's group of inputs from its scales."""


def _place_variables(module: nnx.Module, plan: ShardingPlan) -> None:
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            value = variable.get_value()
            variable.set_value(jax.device_put(value, plan.variable_sharding(variable, value.shape)))


def shard_quantized(weight: Any, plan: ShardingPlan, name: str) -> Any:
    """Place one `QuantizedWeight` (`name`: its layer) on the plan's mesh; refuse a split that cuts a group."""
    problem = weight.split_problem(plan)
    if problem:
        raise GroupSplitError(f"{name}: {problem}")
    _place_variables(weight, plan)
    return weight


def shard_model(model: nnx.Module, plan: ShardingPlan) -> nnx.Module:
    """Move every parameter of an existing model (quantized storage too) onto the plan's mesh (in place).

    Refuses, before moving anything, a mesh that would split a head or cut a quantized weight's group.
    """
    from model_lib.quantization.base import QuantizedWeight

    if hasattr(model, "config"):
        plan.check_heads(model.config)
    for path, node in nnx.iter_graph(model):
        problem = node.split_problem(plan) if isinstance(node, QuantizedWeight) else None
        if problem:
            raise GroupSplitError(f"{'.'.join(map(str, path))}: {problem}")
    _place_variables(model, plan)
    return model
