"""RMSNorm and LayerNorm, computed in float32 and cast back to the input dtype.

`weight_offset` covers Gemma's `(1 + w)` parametrisation (weights stored around 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, weight_offset: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - weight_offset, dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...].astype(jnp.float32) + self.weight_offset
        return (x32 * scale).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, use_bias: bool, dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("norm",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm | LayerNorm:
    """The family's norm over `dim` features (hidden size by default)."""
    dim = config.hidden_size if dim is None else dim
    dtype = jnp.dtype(config.dtype)
    if config.norm_kind == "rms":
        return RMSNorm(dim, eps=config.norm_eps, weight_offset=config.norm_weight_offset, dtype=dtype)
    if config.norm_kind == "layer":
        return LayerNorm(dim, eps=config.norm_eps, use_bias=config.norm_bias, dtype=dtype)
    raise ValueError(f"unknown norm kind {config.norm_kind!r}")
