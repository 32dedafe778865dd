"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): a SigLIP tower, a pooling projector, a Gemma 3 decoder.

An image is resized to the tower's square size; the tower's last hidden state (after
`post_layernorm`), a p x p patch grid, is average-pooled to t x t (`mm_tokens_per_image` = t^2),
normed by Gemma's (1 + w) RMSNorm and projected by the bare `mm_input_projection_weight [D, E]`.
In the prompt an image is `<start_of_image>` (boi), which the processor expands to
`"\\n\\n" + boi + <image_soft_token> x t^2 + <end_of_image> + "\\n\\n"` before tokenizing; the run
of soft tokens takes the feature rows, and its tokens attend to each other in both directions
(transformers' `token_type_ids` blocks) while everything else stays causal.

Glossary: p patches per side, t pooled tokens per side, k = p / t pool size, D vision width, E text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import RMSNorm
from model_lib.vision.config import MultiModalConfig
from model_lib.vision.siglip import SiglipVisionTower
from model_lib.vision.vlm import VisionLanguageModel

# The token texts of Gemma 3's tokenizer (its `boi_token`, `image_token`, `eoi_token`), which its processor writes.
BOI, IMAGE, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"


@dataclass(frozen=True)
class Gemma3VisionConfig(MultiModalConfig):
    """The SigLIP tower's last state (`feature_layers` (-1,), every token) pooled to `mm_tokens_per_image` rows."""

    mm_tokens_per_image: int = 256
    projector_norm_eps: float = 1e-6
    bidirectional_images = True  # each image's run of placeholders attends to itself both ways

    def __post_init__(self) -> None:
        super().__post_init__()
        side = round(self.mm_tokens_per_image**0.5)
        patches = self.vision.image_size // self.vision.patch_size
        if side * side != self.mm_tokens_per_image or patches % side:
            raise ValueError(f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square whose side divides "
                             f"the tower's {patches} patches per side")

    @property
    def image_tokens(self) -> int:
        return self.mm_tokens_per_image

    @property
    def tokens_per_side(self) -> int:
        return round(self.mm_tokens_per_image**0.5)

    def prompt_text(self, text: str) -> str:
        """Each `<start_of_image>` expanded as Gemma3Processor expands it, newlines included (tokenized with the
        text around it, as the processor does)."""
        return text.replace(BOI, f"\n\n{BOI}{IMAGE * self.mm_tokens_per_image}{EOI}\n\n")

    def check_processor(self, processor: Any) -> None:
        if getattr(processor, "do_pan_and_scan", False):
            raise ValueError("Gemma 3 pan-and-scan (do_pan_and_scan=True in the image processor) is not supported: "
                             "each image is encoded whole at the tower's size")


class Gemma3MultiModalProjector(nnx.Module):
    """`norm(avg_pool(features)) @ mm_input_projection_weight`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        mm: Gemma3VisionConfig = config.multimodal
        dtype = jnp.dtype(config.dtype)
        d, e = mm.vision.hidden_size, config.hidden_size
        self.patches_per_side = mm.vision.image_size // mm.vision.patch_size
        self.tokens_per_side = mm.tokens_per_side
        init = jax.nn.initializers.normal(config.initializer_range)
        self.mm_input_projection_weight = nnx.Param(init(rngs.params(), (d, e), dtype))
        self.mm_soft_emb_norm = RMSNorm((d,), eps=mm.projector_norm_eps, weight_offset=1.0, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """Tower states `[p * p, D]` -> `[t * t, E]`."""
        p, t, d = self.patches_per_side, self.tokens_per_side, features.shape[-1]
        k = p // t
        pooled = features.astype(jnp.float32).reshape(t, k, t, k, d).mean(axis=(1, 3))  # [t, t, D]
        normed = self.mm_soft_emb_norm(pooled.reshape(t * t, d).astype(features.dtype))
        weight = self.mm_input_projection_weight[...]
        return jnp.einsum("nd,de->ne", normed.astype(weight.dtype), weight).astype(features.dtype)


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    """`pixel_values`: one `[C, S, S]` array per image (the processor's, without pan-and-scan crops)."""

    mm_class, tower_class, projector_class = Gemma3VisionConfig, SiglipVisionTower, Gemma3MultiModalProjector

    @staticmethod
    def encode(mm: Gemma3VisionConfig, modules: tuple, pixels: jax.Array) -> jax.Array:
        """`[C, S, S]` -> `[mm_tokens_per_image, E]`."""
        tower, projector = modules
        return projector(tower.last_hidden_state(pixels[None])[0])
