"""The SigLIP vision transformer (HF `SiglipVisionModel`: LLaVA-OneVision's and Gemma 3's tower).

CLIP's encoder layers with a biased patch convolution, learned positions, no CLS token and no
pre-norm; `post_layernorm` ends the tower. Attribute names are transformers', so weights load
by identity. The attention-pooling `head` is not held: no vision-language model reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.layers import Embed
from model_lib.vision.clip import PatchConv, VisionEncoder, layer_norm
from model_lib.vision.config import VisionConfig


class SiglipEmbeddings(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        init = jax.nn.initializers.normal(0.02)
        shape = (config.hidden_size, config.num_channels, config.patch_size, config.patch_size)
        self.patch_embedding = PatchConv(nnx.Param(init(rngs.params(), shape, dtype)),
                                         nnx.Param(jnp.zeros((config.hidden_size,), dtype)))
        self.position_embedding = Embed(config.num_patches, config.hidden_size, axes=(None, None), dtype=dtype,
                                        init_std=0.02, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`[B, C, H, W]` -> `[B, patches, E]`."""
        x = self.patch_embedding(pixel_values, self.patch_size)
        return x + self.position_embedding.weight[...].astype(x.dtype)[None]


class SiglipVisionTower(nnx.Module):
    """`hidden_states(pixels, depth)` as `CLIPVisionTower`'s; `last_hidden_state(pixels)` ends with `post_layernorm`."""

    def __init__(self, config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.embeddings = SiglipEmbeddings(config, dtype, rngs=rngs)
        self.encoder = VisionEncoder(config, dtype, rngs=rngs)
        self.post_layernorm = layer_norm(config, dtype)

    def hidden_states(self, pixel_values: jax.Array, depth: int) -> list[jax.Array]:
        return self.encoder.hidden_states(self.embeddings(pixel_values), depth)

    def last_hidden_state(self, pixel_values: jax.Array) -> jax.Array:
        return self.post_layernorm(self.hidden_states(pixel_values, len(self.encoder.layers))[-1])
