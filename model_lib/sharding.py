"""Logical axis names -> mesh axes, resolved once through a rules table.

Every parameter carries `logical_axes` metadata (`("embed", "mlp")`); a
`ShardingPlan` pairs a device mesh (axes `data`, `fsdp`, `tensor`, `expert`) with
rules mapping each logical name to zero or more mesh axes. Presets live in
`configs/mesh/*.yaml`. Model code never names a mesh axis.

A dimension that the chosen mesh axes do not divide is left replicated on those
axes (for example the single kv head of an MQA model under 8-way tensor
parallelism), so any preset works with any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def _as_axes(rule: str | Sequence[str] | None) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


@dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the rules that place every logical axis on it."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def partition_spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        used: set[str] = set()
        spec: list[tuple[str, ...] | None] = []
        for name, size in zip(logical_axes, shape):
            axes = [a for a in _as_axes(self.rules.get(name)) if a in self.mesh.shape and a not in used]
            while axes and size % math.prod(self.mesh.shape[a] for a in axes):
                axes.pop()
            used.update(axes)
            spec.append(tuple(axes) if axes else None)
        return PartitionSpec(*spec)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.partition_spec(logical_axes, shape))

    def place(self, array: np.ndarray, logical_axes: Sequence[str | None]) -> jax.Array:
        """Put a host array on the mesh, copying to each device only its own shard."""
        sharding = self.sharding(logical_axes, array.shape)
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
    return ShardingPlan(mesh, rules)


def as_plan(mesh: Mesh | ShardingPlan | str | None) -> ShardingPlan | None:
    """Accept a plan, a preset name, or a bare mesh (which gets `DEFAULT_RULES`)."""
    if mesh is None or isinstance(mesh, ShardingPlan):
        return mesh
    if isinstance(mesh, (str, Path)):
        return load_mesh_preset(mesh)
    if isinstance(mesh, Mesh):
        return ShardingPlan(mesh)
    raise TypeError(f"expected a Mesh, ShardingPlan or preset name, got {type(mesh).__name__}")


def shard_model(model: nnx.Module, plan: ShardingPlan) -> nnx.Module:
    """Move every parameter of an existing model onto the plan's mesh (in place)."""
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            value = variable.get_value()
            sharding = plan.sharding(variable.get_metadata()["logical_axes"], value.shape)
            variable.set_value(jax.device_put(value, sharding))
    return model
