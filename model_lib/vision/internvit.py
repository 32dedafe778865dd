"""InternViT (HF `InternVLVisionModel`, InternVL's tower) as Flax NNX modules.

A CLS token and learned absolute positions, pre-norm layers (LayerNorm or RMSNorm) whose two
branches are scaled by learned `lambda_1` / `lambda_2` vectors, optional RMSNorm on the whole
query and key projections, and a final `layernorm` unless `use_mean_pooling`. Tiles are square
at the configured size, so positions are never interpolated. Attribute names are transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import LayerNorm, Linear, RMSNorm
from model_lib.layers.activations import activation
from model_lib.vision.clip import PatchConv, attend
from model_lib.vision.config import VisionConfig

NORM_TYPES = ("layer_norm", "rms_norm")
QK_NORM_EPS = 1e-6  # transformers' InternVLVisionRMSNorm default


@dataclass(frozen=True)
class InternVisionConfig(VisionConfig):
    norm_type: str = "layer_norm"
    qk_norm: bool = False
    attention_bias: bool = False
    final_norm: bool = False  # `layernorm` after the layers (use_mean_pooling=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"InternViT norm_type {self.norm_type!r} is not supported (only {NORM_TYPES})")


def _norm(config: InternVisionConfig, dtype: jnp.dtype) -> LayerNorm | RMSNorm:
    shape = (config.hidden_size,)
    if config.norm_type == "rms_norm":
        return RMSNorm(shape, eps=config.norm_eps, weight_offset=0.0, dtype=dtype)
    return LayerNorm(shape, eps=config.norm_eps, use_bias=True, weight_offset=0.0, dtype=dtype)


def _linear(in_features: int, out_features: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(in_features, out_features, axes=(None, None), use_bias=bias, dtype=dtype, init_std=0.02, rngs=rngs)


class InternPatchEmbeddings(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        shape = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
        self.projection = PatchConv(nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), shape, dtype)),
                                    nnx.Param(jnp.zeros((config.hidden_size,), dtype)))


class InternEmbeddings(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        e = config.hidden_size
        self.cls_token = nnx.Param(jnp.zeros((1, 1, e), dtype))
        self.patch_embeddings = InternPatchEmbeddings(config, dtype, rngs=rngs)
        self.position_embeddings = nnx.Param(jnp.zeros((1, config.num_patches + 1, e), dtype))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embeddings.projection(pixel_values, self.patch_size)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)


class InternAttention(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        e, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj = (_linear(e, e, bias, dtype, rngs) for _ in range(3))
        self.projection_layer = _linear(e, e, True, dtype, rngs)
        norm = (lambda: RMSNorm((e,), eps=QK_NORM_EPS, weight_offset=0.0, dtype=dtype)) if config.qk_norm else None
        self.q_norm = norm() if norm else None
        self.k_norm = norm() if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, e = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, s, self.num_heads, -1) for t in (q, k, v))
        return self.projection_layer(attend(q, k, v).reshape(b, s, e))


class InternMLP(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation(config.activation)
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, True, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, True, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class InternLayer(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layernorm_before = _norm(config, dtype)
        self.attention = InternAttention(config, dtype, rngs=rngs)
        self.layernorm_after = _norm(config, dtype)
        self.mlp = InternMLP(config, dtype, rngs=rngs)
        self.lambda_1 = nnx.Param(jnp.full((config.hidden_size,), 0.1, dtype))
        self.lambda_2 = nnx.Param(jnp.full((config.hidden_size,), 0.1, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.lambda_1[...].astype(x.dtype) * self.attention(self.layernorm_before(x))
        return x + self.lambda_2[...].astype(x.dtype) * self.mlp(self.layernorm_after(x))


class InternEncoder(nnx.Module):
    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layer = nnx.List([InternLayer(config, dtype, rngs=rngs) for _ in range(config.num_layers)])


class InternVisionTower(nnx.Module):
    """`hidden_states(pixels, depth)`: the embeddings and the first `depth` layers' outputs, `[B, 1 + patches, E]`;
    `last_hidden_state(pixels)` adds the final `layernorm` where the config has one."""

    def __init__(self, config: InternVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.embeddings = InternEmbeddings(config, dtype, rngs=rngs)
        self.encoder = InternEncoder(config, dtype, rngs=rngs)
        self.layernorm = (LayerNorm((config.hidden_size,), eps=config.norm_eps, use_bias=True, weight_offset=0.0,
                                    dtype=dtype) if config.final_norm else None)

    def hidden_states(self, pixel_values: jax.Array, depth: int) -> list[jax.Array]:
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in list(self.encoder.layer)[:depth]:
            x = layer(x)
            states.append(x)
        return states

    def last_hidden_state(self, pixel_values: jax.Array) -> jax.Array:
        x = self.hidden_states(pixel_values, len(self.encoder.layer))[-1]
        return x if self.layernorm is None else self.layernorm(x)
