"""Linear projection holding its weight in `[in, out]` layout with logical axes.

HF checkpoints store `weight [out, in]`; the loader transposes (see
`model_lib/checkpoint.py`). The quantized form and LoRA adapter slots attach here
(training issue), so every projection of every family gains them at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with `kernel [in, out]`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool,
        dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = nnx.Param(
            init(rngs.params(), (in_features, out_features), dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=axes[1:]) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y
