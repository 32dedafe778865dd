"""Mllama's tiled vision model (HF `MllamaVisionModel`, Llama 3.2 Vision) as Flax NNX modules.

An image arrives as up to `max_num_tiles` square tiles (the processor's `[T, C, H, W]`, padding tiles
zero) with its `aspect_ratio_id` (1-based index of its tile grid in `supported_aspect_ratios`) and a
mask of its real tiles. Per tile: a bias-free patch convolution, a gated per-aspect-ratio tile
embedding (`pre_tile_positional_embedding`), a CLS token, the gated positional embedding (a learned
table blended with a per-aspect-ratio table of every tile's positions), `layernorm_pre`, and padding of
the tokens to a multiple of 8. The local `transformer` then attends over all tiles of the image at once;
the outputs of its `intermediate_layers_indices` layers are kept. `layernorm_post`, a second gated tile
embedding and the `global_transformer` (layers whose two branches are scaled by tanh of learned gates)
follow. The output per tile token is the final state concatenated with the kept intermediate states
(`vision_output_dim` wide). transformers' attention mask only masks a (padding query, padding key) pair,
padding being the padding tiles' tokens and the tokens added to reach a multiple of 8; real tokens see
everything, and so do the ones here.

Attribute names are transformers', so weights load by identity.

Glossary: I images, T tiles per image (max_num_tiles), C channels, P tokens per tile (CLS + patches),
Q tokens per tile padded to a multiple of 8, E width, L kept intermediate layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import Embed, LayerNorm, Linear
from model_lib.layers.activations import ACTIVATIONS, activation
from model_lib.vision.clip import PatchConv, attend

LAYERNORM_EPS = 1e-5  # `layernorm_pre` / `layernorm_post` are torch's default LayerNorm, whatever norm_eps says


@dataclass(frozen=True)
class MllamaVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_global_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    supported_aspect_ratios: tuple[tuple[int, int], ...]
    intermediate_layers: tuple[int, ...]
    vision_output_dim: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) is not a multiple of heads ({self.num_heads})")
        if any(not 0 <= i < self.num_layers for i in self.intermediate_layers):
            raise ValueError(f"intermediate_layers_indices {list(self.intermediate_layers)} out of range for "
                             f"{self.num_layers} layers")
        if self.vision_output_dim != self.hidden_size * (1 + len(self.intermediate_layers)):
            raise ValueError(f"vision_output_dim ({self.vision_output_dim}) must be hidden_size x (1 + number of "
                             f"intermediate layers) = {self.hidden_size * (1 + len(self.intermediate_layers))}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {self.activation!r}")

    @property
    def tile_tokens(self) -> int:
        """P: tokens per tile (CLS and patches)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


def _linear(in_features: int, out_features: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> Linear:
    # The tower is small beside the language model: replicated on a mesh.
    return Linear(in_features, out_features, axes=(None, None), use_bias=bias, dtype=dtype, init_std=0.02, rngs=rngs)


def _gate(dtype: jnp.dtype, value: float = 0.0) -> nnx.Param:
    return nnx.Param(jnp.full((1,), value, dtype))


def _tanh(gate: nnx.Param) -> jax.Array:
    return jnp.tanh(gate[...].astype(jnp.float32))


class AspectRatioEmbedding(nnx.Module):
    """`pre/post_tile_positional_embedding`: one gated `[T, E]` row per aspect ratio, added to every token of
    each tile."""

    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.embedding = Embed(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size,
                               axes=(None, None), dtype=dtype, init_std=0.02, rngs=rngs)
        self.gate = _gate(dtype)

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """`x [I, T, S, E]` plus the rows of `aspect_ratio_ids [I]`."""
        rows = self.embedding(aspect_ratio_ids).reshape(x.shape[0], x.shape[1], 1, x.shape[-1])
        return x + (rows * _tanh(self.gate)).astype(x.dtype)


class GatedPositionalEmbedding(nnx.Module):
    """`(1 - tanh g) * embedding [P, E]` for every tile, plus `tanh g` times the aspect ratio's `[T, P, E]`."""

    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        p, e = config.tile_tokens, config.hidden_size
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (p, e), dtype) * e**-0.5)
        self.tile_embedding = Embed(config.max_aspect_ratio_id + 1, config.max_num_tiles * p * e, axes=(None, None),
                                    dtype=dtype, init_std=0.02, rngs=rngs)
        self.gate = _gate(dtype)

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """`x [I, T, P, E]`."""
        g = _tanh(self.gate)
        x = x + ((1 - g) * self.embedding[...]).astype(x.dtype)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(x.shape)
        return x + (g * tiles).astype(x.dtype)


class MllamaVisionAttention(nnx.Module):
    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        e = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(e, e, False, dtype, rngs) for _ in range(4))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, s, e = x.shape
        q, k, v = (proj(x).reshape(b, s, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(attend(q, k, v, mask).reshape(b, s, e))


class MllamaVisionMLP(nnx.Module):
    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.act = activation(config.activation)
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, True, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, True, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class MllamaVisionEncoderLayer(nnx.Module):
    """A pre-norm layer; `gated` (the global transformer) scales each branch by tanh of its gate."""

    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, gated: bool, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, use_bias=True, weight_offset=0.0, dtype=dtype)
        self.input_layernorm = LayerNorm((config.hidden_size,), **norm)
        self.self_attn = MllamaVisionAttention(config, dtype, rngs=rngs)
        self.post_attention_layernorm = LayerNorm((config.hidden_size,), **norm)
        self.mlp = MllamaVisionMLP(config, dtype, rngs=rngs)
        self.gate_attn = _gate(dtype, 0.7853981633974483) if gated else None  # transformers' pi / 4
        self.gate_ffn = _gate(dtype, 0.7853981633974483) if gated else None

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (h if self.gate_attn is None else (_tanh(self.gate_attn) * h).astype(x.dtype))
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if self.gate_ffn is None else (_tanh(self.gate_ffn) * h).astype(x.dtype))


class MllamaVisionEncoder(nnx.Module):
    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, num_layers: int, gated: bool, *,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([MllamaVisionEncoderLayer(config, dtype, gated, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The last layer's output and every layer's output."""
        states = []
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return x, states


def padding_mask(aspect_ratio_mask: jax.Array, real_tokens: int, padded_tokens: int) -> jax.Array:
    """`[I, T*Q, T*Q]`: True where a query may see a key (not both padding), from `aspect_ratio_mask [I, T]`."""
    real = (aspect_ratio_mask[:, :, None] > 0) & (jnp.arange(padded_tokens) < real_tokens)[None, None]  # [I, T, Q]
    pad = ~real.reshape(real.shape[0], -1)
    return ~(pad[:, :, None] & pad[:, None, :])


class MllamaVisionModel(nnx.Module):
    """`__call__(pixels [I, T, C, H, W], aspect_ratio_ids [I], aspect_ratio_mask [I, T])` -> `[I, T, P, E*(1+L)]`."""

    def __init__(self, config: MllamaVisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.config = config
        e = config.hidden_size
        shape = (e, config.num_channels, config.patch_size, config.patch_size)
        self.patch_embedding = PatchConv(nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * 0.02))
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (e,), dtype) * e**-0.5)
        self.gated_positional_embedding = GatedPositionalEmbedding(config, dtype, rngs=rngs)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(config, dtype, rngs=rngs)
        self.post_tile_positional_embedding = AspectRatioEmbedding(config, dtype, rngs=rngs)
        norm = dict(eps=LAYERNORM_EPS, use_bias=True, weight_offset=0.0, dtype=dtype)
        self.layernorm_pre = LayerNorm((e,), **norm)
        self.layernorm_post = LayerNorm((e,), **norm)
        self.transformer = MllamaVisionEncoder(config, dtype, config.num_layers, False, rngs=rngs)
        self.global_transformer = MllamaVisionEncoder(config, dtype, config.num_global_layers, True, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array, aspect_ratio_mask: jax.Array) -> jax.Array:
        config = self.config
        i, t = pixel_values.shape[:2]
        x = self.patch_embedding(pixel_values.reshape(i * t, *pixel_values.shape[2:]), config.patch_size)
        e = x.shape[-1]
        x = self.pre_tile_positional_embedding(x.reshape(i, t, -1, e), aspect_ratio_ids)  # [I, T, P-1, E]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (i, t, 1, e))
        x = self.gated_positional_embedding(jnp.concatenate([cls, x], axis=2), aspect_ratio_ids)  # [I, T, P, E]
        x = self.layernorm_pre(x)
        p = x.shape[2]
        q = -(-p // 8) * 8
        x = jnp.pad(x, ((0, 0), (0, 0), (0, q - p), (0, 0))).reshape(i, t * q, e)
        mask = padding_mask(aspect_ratio_mask, p, q)
        x, states = self.transformer(x, mask)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(i, t, q, e), aspect_ratio_ids).reshape(i, t * q, e)
        x, _ = self.global_transformer(x, mask)
        # transformers stacks the kept states on a last axis and flattens it: features interleave (E, L).
        kept = jnp.stack([states[j] for j in config.intermediate_layers], axis=-1).reshape(i, t, q, -1)
        return jnp.concatenate([x.reshape(i, t, q, e), kept], axis=-1)[:, :, :p]
