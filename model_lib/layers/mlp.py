"""Feed-forward blocks: gated (`down(act(gate(x)) * up(x))`) or plain (`down(act(up(x)))`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers.activations import activation
from model_lib.layers.linear import Linear


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, intermediate_size: int | None = None):
        self.act = activation(config.activation)
        common = dict(
            use_bias=config.mlp_bias,
            dtype=jnp.dtype(config.dtype),
            init_std=config.initializer_range,
            rngs=rngs,
        )
        hidden, inner = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = Linear(hidden, inner, axes=("embed", "mlp"), **common) if config.mlp_gated else None
        self.up_proj = Linear(hidden, inner, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(inner, hidden, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
