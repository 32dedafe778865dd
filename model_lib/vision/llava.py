"""LLaVA: a CLIP vision tower, a two-layer projector, and any decoder of the registry.

`LlavaForConditionalGeneration` is a `CausalLM` (its `model` is the language model, so the
engine, LoRA and the trainer see the decoder they know) that also holds `vision_tower` and
`multi_modal_projector`. `image_features` runs the tower on preprocessed pixels; the decoder
takes the features through `MergedEmbeddings` at the image placeholder tokens.

Glossary: B images, S tokens per image, F image feature rows (`MultiModalConfig.image_tokens`),
E text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import Linear
from model_lib.layers.activations import activation
from model_lib.vision.clip import CLIPVisionTower
from model_lib.vision.config import MultiModalConfig, VisionConfig
from model_lib.vision.merge import MergedEmbeddings, placeholder_index
from model_lib.vision.siglip import SiglipVisionTower
from model_lib.vision.vlm import VisionLanguageModel


def vision_tower(config: VisionConfig, dtype: jnp.dtype, *, rngs: nnx.Rngs) -> CLIPVisionTower | SiglipVisionTower:
    """The tower a LLaVA-style checkpoint names (`vision_config.model_type`)."""
    return (SiglipVisionTower if config.kind == "siglip" else CLIPVisionTower)(config, dtype, rngs=rngs)


class LlavaMultiModalProjector(nnx.Module):
    """`linear_2(act(linear_1(features)))`: vision width (times feature layers) -> text width."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        mm: MultiModalConfig = config.multimodal
        common = dict(use_bias=mm.projector_bias, dtype=jnp.dtype(config.dtype), init_std=config.initializer_range,
                      rngs=rngs)
        in_features = mm.vision.hidden_size * len(mm.feature_layers)
        self.act = activation(mm.projector_activation)
        self.linear_1 = Linear(in_features, config.hidden_size, axes=(None, "embed"), **common)
        self.linear_2 = Linear(config.hidden_size, config.hidden_size, axes=("embed", None), **common)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(features)))


def image_features(
    mm: MultiModalConfig, tower: CLIPVisionTower | SiglipVisionTower, projector: LlavaMultiModalProjector, pixel_values: jax.Array
) -> jax.Array:
    """The selected tower layers (the first token, CLIP's CLS, dropped by the "default" strategy), concatenated and projected:
    `[B, C, H, W]` -> `[B, F, E]`. A function of the two vision modules alone, so that a server can
    hold them without the language model."""
    states = tower.hidden_states(pixel_values, mm.deepest_layer)
    selected = [states[layer % (mm.vision.num_layers + 1)] for layer in mm.feature_layers]
    if mm.feature_strategy == "default":
        selected = [s[:, 1:] for s in selected]
    return projector(jnp.concatenate(selected, axis=-1))


class LlavaForConditionalGeneration(VisionLanguageModel):
    """A decoder whose image placeholder tokens take projected CLIP features."""

    tower_class, projector_class = staticmethod(vision_tower), LlavaMultiModalProjector

    @staticmethod
    def encode(mm: MultiModalConfig, modules: tuple, pixels: jax.Array) -> jax.Array:
        """One image `[C, H, W]` -> `[F, E]`."""
        return image_features(mm, *modules, pixels[None])[0]

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Preprocessed images `[B, C, H, W]` -> features `[B, F, E]`, one row per placeholder token."""
        return image_features(self.config.multimodal, self.vision_tower, self.multi_modal_projector, pixel_values)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        pixel_values: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        merged: MergedEmbeddings | None = None,
    ) -> jax.Array:
        """Logits for a `[B, T]` batch whose `image_token_id` runs take the images of `pixel_values` in order
        (or features already placed: `merged`, as the trainer builds them)."""
        if pixel_values is not None:
            if merged is not None:
                raise ValueError("pass pixel_values or merged features, not both")
            input_ids = jnp.asarray(input_ids, jnp.int32)
            features = self.image_features(jnp.asarray(pixel_values))
            merged = MergedEmbeddings(features.reshape(-1, features.shape[-1]),
                                      placeholder_index(input_ids, self.config.multimodal.image_token_id))
        return VisionLanguageModel.__call__(self, input_ids, attention_mask, segment_ids=segment_ids,
                                            positions=positions, merged=merged)
