"""The one interface every stored weight format gives `Linear`: a matmul and a dequantize.

A format is an `nnx.Module` holding its arrays as `QuantState` (frozen: never trained, never
cast by a dtype change) that implements `QuantizedWeight`. `Linear` keeps one slot for it and
never branches on the format; adding a format adds a module here, not a branch there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class QuantState(nnx.Variable):
    """Frozen quantized storage (never trained, never cast)."""


class QuantizedWeight(nnx.Module):
    """A `[in, out]` kernel stored in a compressed form; `shape` is the float kernel's shape."""

    shape: tuple[int, ...]

    def matmul(self, x: jax.Array) -> jax.Array:
        """`x [..., in] @ dequantize() -> [..., out]` in `x.dtype`, without keeping the float kernel."""
        raise NotImplementedError

    def dequantize(self, dtype: Any) -> jax.Array:
        """The float `[in, out]` kernel in `dtype` (traceable)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        _, state = nnx.split(self)
        return sum(int(v.get_value().nbytes) for _, v in nnx.to_flat_state(state))


def on_device(value: Any) -> Any:
    """Host arrays go to the default device; placed (or abstract) arrays stay as they are."""
    return jnp.asarray(value) if isinstance(value, np.ndarray) else value
