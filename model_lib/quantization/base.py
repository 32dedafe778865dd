"""The one interface every stored weight format gives `Linear`: a matmul and a dequantize.

A format is an `nnx.Module` holding its arrays as `QuantState` (frozen: never trained, never
cast by a dtype change) that implements `QuantizedWeight`. `Linear` keeps one slot for it and
never branches on the format; adding a format adds a module here, not a branch there.

Sharding: each stored array carries the logical axes of the kernel dimensions it follows
(`storage_meta`), so a `ShardingPlan` splits it with the kernel: values along both axes, scales and
zero points with their output channels and (for formats with groups along the input) their groups.
A split of the input dimension must keep each group of inputs on one device with its scales;
`split_problem` names a mesh that would cut one, and `shard_model` refuses it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


if TYPE_CHECKING:
    from model_lib.sharding import ShardingPlan


class QuantState(nnx.Variable):
    """Frozen quantized storage (never trained, never cast)."""


def storage_meta(axes: Sequence[str | None] | None, head_size: int, dims: Sequence[str | None],
                 in_unit: int = 1) -> dict[str, Any]:
    """`QuantState` metadata of an array whose dimensions follow the kernel's `dims` ("in", "out" or None).

    `in_unit`: kernel input rows per stored row along "in" (2 for packed nibbles, the group size for
    group scales). Along a head axis a head then spans `head_size / in_unit` stored rows; a group
    wider than a head counts as one unit, so such a split keeps whole groups.
    """
    in_axis, out_axis = tuple(axes) if axes is not None else (None, None)
    names = tuple({"in": in_axis, "out": out_axis}.get(d) if d else None for d in dims)
    if "in" in dims and in_axis is not None and in_axis.endswith("heads"):
        head_size = max(1, head_size // in_unit)
    return {"logical_axes": names, "head_size": head_size}


class QuantizedWeight(nnx.Module):
    """A `[in, out]` kernel stored in a compressed form; `shape` is the float kernel's shape."""

    shape: tuple[int, ...]
    # (values array, its input dimension, the group-scale arrays with groups first) of a format whose
    # scales are per group of inputs; None where no scale spans inputs (per-channel int8).
    GROUPED: tuple[str, int, tuple[str, ...]] | None = None

    def matmul(self, x: jax.Array) -> jax.Array:
        """`x [..., in] @ dequantize() -> [..., out]` in `x.dtype`, without keeping the float kernel."""
        raise NotImplementedError

    def dequantize(self, dtype: Any) -> jax.Array:
        """The float `[in, out]` kernel in `dtype` (traceable)."""
        raise NotImplementedError

    def split_problem(self, plan: ShardingPlan) -> str | None:
        """Why `plan` would cut a group of inputs away from its scales (None when every shard holds whole groups)."""
        if self.GROUPED is None:
            return None
        values, dim, scale_names = self.GROUPED
        groups = getattr(self, scale_names[0]).shape[0]

        def mesh_axes(name: str, index: int) -> tuple[str, ...]:
            variable = getattr(self, name)
            metadata = variable.get_metadata()
            entry = plan.partition_spec(metadata["logical_axes"], variable.shape, metadata["head_size"])[index]
            return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

        split = mesh_axes(values, dim)
        if groups == 1 or not split:
            return None
        try:
            if all(mesh_axes(name, 0) == split for name in scale_names):
                return None
        except ValueError:  # the groups do not divide over the head axes' devices
            pass
        devices = math.prod(plan.mesh.shape[a] for a in split)
        valid = [d for d in range(1, groups + 1) if groups % d == 0]
        return (f"{type(self).__name__} {self.shape}: a split of its {self.shape[0]} inputs over mesh axes {split} "
                f"({devices} devices) cuts its {groups} groups of {self.shape[0] // groups} inputs from their "
                f"scales; valid sizes: {', '.join(map(str, valid))}")

    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        _, state = nnx.split(self)
        return sum(int(v.get_value().nbytes) for _, v in nnx.to_flat_state(state))


def on_device(value: Any) -> Any:
    """Host arrays go to the default device; placed (or abstract) arrays stay as they are."""
    return jnp.asarray(value) if isinstance(value, np.ndarray) else value
