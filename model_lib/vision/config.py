"""Frozen descriptions of a vision tower and of how its features reach the language model.

Read from a multimodal checkpoint's `vision_config` and top-level keys by the family mapping
(`model_lib/families/llava.py`); model code reads only these classes.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_IMAGE_SIZE = 4096  # a bound on `image_size` read from a config (pixels per side)
FEATURE_STRATEGIES = ("default", "full")  # LLaVA's vision_feature_select_strategy: drop the CLS token, or keep it


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP-style ViT: patch embedding, learned positions with a CLS token, pre-norm encoder layers."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"

    def __post_init__(self) -> None:
        if not 0 < self.patch_size <= self.image_size <= MAX_IMAGE_SIZE or self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}), "
                             f"at most {MAX_IMAGE_SIZE}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) is not a multiple of num_heads ({self.num_heads})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class MultiModalConfig:
    """How image features replace placeholder tokens (LLaVA).

    `feature_layers`: the tower's hidden states concatenated as features (index 0 is the
    embeddings, -1 the last layer's output, as transformers' `hidden_states`);
    `feature_strategy` "default" drops the CLS token, "full" keeps it. Each image fills
    `image_tokens` consecutive `image_token_id` placeholders.
    """

    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)
    feature_strategy: str = "default"
    projector_activation: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self) -> None:
        if self.feature_strategy not in FEATURE_STRATEGIES:
            raise ValueError(f"unknown vision_feature_select_strategy {self.feature_strategy!r}; "
                             f"expected one of {FEATURE_STRATEGIES}")
        depth = self.vision.num_layers
        if not self.feature_layers or any(not -depth - 1 <= layer <= depth for layer in self.feature_layers):
            raise ValueError(f"vision_feature_layer {list(self.feature_layers)} out of range for {depth} layers")

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens (and feature rows) per image."""
        return self.vision.num_patches + (1 if self.feature_strategy == "full" else 0)

    @property
    def deepest_layer(self) -> int:
        """How many encoder layers the selected features need."""
        return max(layer % (self.vision.num_layers + 1) for layer in self.feature_layers)
