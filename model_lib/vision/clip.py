"""The CLIP vision transformer (HF `CLIPVisionModel`, the LLaVA vision tower) as Flax NNX modules.

Attribute names are transformers' (`embeddings.patch_embedding`, `pre_layrnorm` with its
typo, `encoder.layers.N.self_attn.q_proj`, `mlp.fc1`, `layer_norm1`), so weights load by
identity. Attention is bidirectional over the `1 + patches` tokens of one image.

Glossary: B images, C channels, P patch side, S tokens per image (CLS + patches), E width,
N heads, H head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import Embed, LayerNorm, Linear
from model_lib.layers.activations import activation
from model_lib.vision.config import VisionConfig


def _linear(in_features: int, out_features: int, dtype: jnp.dtype, rngs: nnx.Rngs, *, bias: bool = True) -> Linear:
    # The tower is small beside the language model: replicated on a mesh (no logical axes to split).
    return Linear(in_features, out_features, axes=(None, None), use_bias=bias, dtype=dtype, init_std=0.02, rngs=rngs)


def layer_norm(config: VisionConfig, dtype: jnp.dtype) -> LayerNorm:
    return LayerNorm((config.hidden_size,), eps=config.norm_eps, use_bias=True, weight_offset=0.0, dtype=dtype)


class VisionEmbeddings(nnx.Module):
    """Non-overlapping patches projected to `E` (a stride-P convolution without bias), CLS token first."""

    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        init = jax.nn.initializers.normal(0.02)
        shape = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
        self.patch_embedding = PatchConv(nnx.Param(init(rngs.params(), shape, dtype)))
        self.class_embedding = nnx.Param(init(rngs.params(), (config.hidden_size,), dtype))
        self.position_embedding = Embed(config.num_patches + 1, config.hidden_size, axes=(None, None), dtype=dtype,
                                        init_std=0.02, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`[B, C, H, W]` -> `[B, S, E]`."""
        b, p = pixel_values.shape[0], self.patch_size
        x = self.patch_embedding(pixel_values, p)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.weight[...].astype(x.dtype)[None]


class PatchConv(nnx.Module):
    """Holds the patch convolution's `weight [E, C, P, P]` (and `bias [E]`) under HF's names (a conv, not a
    linear kernel); applies it as a stride-P convolution."""

    def __init__(self, weight: nnx.Param, bias: nnx.Param | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, pixel_values: jax.Array, p: int) -> jax.Array:
        """`[B, C, H, W]` -> `[B, (H / P) * (W / P), E]`, patches row-major."""
        b, c, h, w = pixel_values.shape
        patches = pixel_values.reshape(b, c, h // p, p, w // p, p)  # [B, C, h, P, w, P]
        weight = self.weight[...]
        x = jnp.einsum("bcipjq,ecpq->bije", patches.astype(weight.dtype), weight).reshape(b, -1, weight.shape[0])
        return x if self.bias is None else x + self.bias[...].astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Bidirectional softmax attention over one image's tokens, float32: `[B, S, N, H]` each -> `[B, S, N, H]`.

    `mask [B, S, S]` (True: query may see key) masks with the float32 minimum, as transformers' additive
    masks do: a row that sees no key spreads evenly over all of them."""
    scores = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v.astype(jnp.float32)).astype(q.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        e = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj = (_linear(e, e, dtype, rngs) for _ in range(3))
        self.out_proj = _linear(e, e, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, e = x.shape
        q, k, v = (proj(x).reshape(b, s, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v).reshape(b, s, e))


class VisionMLP(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation(config.activation)
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(config, dtype)
        self.self_attn = VisionAttention(config, dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(config, dtype)
        self.mlp = VisionMLP(config, dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionEncoderLayer(config, dtype, rngs=rngs) for _ in range(config.num_layers)])

    def hidden_states(self, x: jax.Array, depth: int) -> list[jax.Array]:
        """The input and the outputs of the first `depth` layers."""
        states = [x]
        for layer in list(self.layers)[:depth]:
            x = layer(x)
            states.append(x)
        return states


class CLIPVisionTower(nnx.Module):
    """`hidden_states(pixels, depth)`: the embeddings and the outputs of the first `depth` layers.

    `post_layernorm` is held (checkpoints carry it) but LLaVA never reads the pooled output.
    """

    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.embeddings = VisionEmbeddings(config, dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(config, dtype)
        self.encoder = VisionEncoder(config, dtype, rngs=rngs)
        self.post_layernorm = layer_norm(config, dtype)

    def hidden_states(self, pixel_values: jax.Array, depth: int) -> list[jax.Array]:
        """`[B, C, H, W]` -> `depth + 1` arrays `[B, S, E]` (transformers' `hidden_states[:depth + 1]`)."""
        return self.encoder.hidden_states(self.pre_layrnorm(self.embeddings(pixel_values)), depth)
