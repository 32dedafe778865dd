"""The Pixtral vision transformer (HF `PixtralVisionModel`, Mistral 3's tower) as Flax NNX modules.

Images keep their own (height, width), multiples of the patch size: a bias-free patch
convolution, `ln_pre` (RMSNorm), then pre-norm layers with RMSNorm, SwiGLU and axial 2D RoPE:
the first half of each rotary half turns with the patch's row, the second with its column
(inverse frequencies alternate between the two). One image at a time, so attention is
full over its patches, or (training's padded pixels) over the `valid` ones. Attribute names are transformers'.

Glossary: P patch side, h x w patches, E width, N heads, H head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import Linear, RMSNorm
from model_lib.layers.activations import activation
from model_lib.vision.clip import PatchConv, attend
from model_lib.vision.config import VisionConfig

NORM_EPS = 1e-5  # transformers fixes Pixtral's norm epsilon


def _linear(in_features: int, out_features: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(in_features, out_features, axes=(None, None), use_bias=False, dtype=dtype, init_std=0.02, rngs=rngs)


def _norm(config: VisionConfig, dtype: jnp.dtype) -> RMSNorm:
    return RMSNorm((config.hidden_size,), eps=NORM_EPS, weight_offset=0.0, dtype=dtype)


def axial_rope(config: VisionConfig, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) `[h * w, H]` for patches row-major."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    angles = jnp.concatenate([rows.reshape(-1, 1) * inv_freq[0::2], cols.reshape(-1, 1) * inv_freq[1::2]], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`[B, S, N, H]` rotated by `[S, H]` angles (the halves-rotation of Llama's RoPE)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    turned = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[None, :, None] + turned * sin[None, :, None]).astype(x.dtype)


class PixtralAttention(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        e = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(e, e, dtype, rngs) for _ in range(4))

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array | None = None) -> jax.Array:
        b, s, e = x.shape
        q, k, v = (proj(x).reshape(b, s, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        return self.o_proj(attend(q, k, v, mask).reshape(b, s, e))


class PixtralMLP(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation(config.activation)
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralAttentionLayer(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.attention_norm = _norm(config, dtype)
        self.attention = PixtralAttention(config, dtype, rngs=rngs)
        self.ffn_norm = _norm(config, dtype)
        self.feed_forward = PixtralMLP(config, dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), rope, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layers = nnx.List([PixtralAttentionLayer(config, dtype, rngs=rngs) for _ in range(config.num_layers)])


class PixtralVisionTower(nnx.Module):
    """`hidden_states(pixels, depth, valid)`: `ln_pre`'s output and the outputs of the first `depth` layers, each
    `[B, h * w, E]` for `[B, C, h * P, w * P]` pixels; with `valid [B, h * w]`, patches attend only to valid ones
    (an image padded at its bottom and right: its rows are those of the image alone)."""

    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.config = config
        init = jax.nn.initializers.normal(0.02)
        shape = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
        self.patch_conv = PatchConv(nnx.Param(init(rngs.params(), shape, dtype)))
        self.ln_pre = _norm(config, dtype)
        self.transformer = PixtralTransformer(config, dtype, rngs=rngs)

    def hidden_states(self, pixel_values: jax.Array, depth: int, valid: jax.Array | None = None) -> list[jax.Array]:
        p = self.config.patch_size
        h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        rope = axial_rope(self.config, h, w)
        mask = None if valid is None else jnp.broadcast_to(valid[:, None, :], (valid.shape[0], h * w, h * w))
        x = self.ln_pre(self.patch_conv(pixel_values, p))
        states = [x]
        for layer in list(self.transformer.layers)[:depth]:
            x = layer(x, rope, mask)
            states.append(x)
        return states
