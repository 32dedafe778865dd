"""Feed-forward blocks: gated (`down(act(gate(x)) * up(x))`) or plain (`down(act(up(x)))`),
with the layer's own intermediate size; and the one-projection replacement `LinearMLP`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers.activations import activation
from model_lib.layers.linear import Linear


class MLP(nnx.Module):
    def __init__(
        self, config: ModelConfig, layer: int | None = None, *, rngs: nnx.Rngs, intermediate_size: int | None = None
    ):
        self.act = activation(config.activation)
        common = dict(
            use_bias=config.mlp_bias,
            dtype=jnp.dtype(config.dtype),
            init_std=config.initializer_range,
            rngs=rngs,
        )
        hidden = config.hidden_size
        inner = intermediate_size or (config.intermediate_size if layer is None else config.layer_intermediate_size(layer))
        self.gate_proj = Linear(hidden, inner, axes=("embed", "mlp"), **common) if config.mlp_gated else None
        self.up_proj = Linear(hidden, inner, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(inner, hidden, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def hidden_projection(config: ModelConfig, rngs: nnx.Rngs) -> Linear:
    """A bias-free hidden->hidden projection whose output shards like an MLP's inner dimension."""
    hidden = config.hidden_size
    return Linear(
        hidden,
        hidden,
        axes=("embed", "mlp"),
        use_bias=False,
        dtype=jnp.dtype(config.dtype),
        init_std=config.initializer_range,
        rngs=rngs,
    )


class LinearMLP(nnx.Module):
    """MLP replaced by one bias-free hidden->hidden projection `linear_mlp` (DeciLM's `replace_with_linear`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.linear_mlp = hidden_projection(config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_mlp(x)
