"""RMSNorm and LayerNorm, computed in float32 and cast back to the input dtype.

Both normalise over the last axis. `weight_offset` covers weights stored around 0
and applied as `(1 + w)`: Gemma's RMSNorm and Nemotron's LayerNorm1p. A weight
of shape `[H, D]` gives each head its own norm (Cohere's q/k norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig


def _norm_param(shape: tuple[int, ...], value: float, dtype: jnp.dtype) -> nnx.Param:
    axes = (None,) * (len(shape) - 1) + ("norm",)
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, shape: tuple[int, ...], *, eps: float, weight_offset: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = _norm_param(shape, 1.0 - weight_offset, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...].astype(jnp.float32) + self.weight_offset
        return (x32 * scale).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, shape: tuple[int, ...], *, eps: float, use_bias: bool, weight_offset: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = _norm_param(shape, 1.0 - weight_offset, dtype)
        self.bias = _norm_param(shape, 0.0, dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        scale = self.weight[...].astype(jnp.float32) + self.weight_offset
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(config: ModelConfig, shape: int | tuple[int, ...] | None = None) -> RMSNorm | LayerNorm:
    """The family's norm with weights of `shape` (the hidden size by default)."""
    shape = (config.hidden_size,) if shape is None else (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = jnp.dtype(config.dtype)
    if config.norm_kind == "rms":
        return RMSNorm(shape, eps=config.norm_eps, weight_offset=config.norm_weight_offset, dtype=dtype)
    if config.norm_kind == "layer":
        return LayerNorm(
            shape, eps=config.norm_eps, use_bias=config.norm_bias, weight_offset=config.norm_weight_offset, dtype=dtype
        )
    raise ValueError(f"unknown norm kind {config.norm_kind!r}")
