"""Frozen descriptions of a vision tower and of how its features reach the language model.

Read from a multimodal checkpoint's `vision_config` and top-level keys by the family mapping
(`model_lib/families/llava.py`); model code reads only these classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

MAX_IMAGE_SIZE = 4096  # a bound on `image_size` read from a config (pixels per side)
FEATURE_STRATEGIES = ("default", "full")
VISION_KINDS = ("clip", "siglip", "pixtral")  # LLaVA's vision_feature_select_strategy: drop the CLS token, or keep it


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
    kind: str = "clip"  # "clip": CLS token and pre-norm; "siglip": neither, a biased patch conv; "pixtral"
    rope_theta: float = 10000.0  # Pixtral's axial RoPE


    def __post_init__(self) -> None:
        if not 0 < self.patch_size <= self.image_size <= MAX_IMAGE_SIZE or self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}), "
                             f"at most {MAX_IMAGE_SIZE}")
        if self.kind not in VISION_KINDS:
            raise ValueError(f"unknown vision tower kind {self.kind!r}; expected one of {VISION_KINDS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) is not a multiple of num_heads ({self.num_heads})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Tokens per image out of the tower (patches, and CLIP's CLS)."""
        return self.num_patches + (self.kind == "clip")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class ImagePlaceholders:
    """What the prompt side needs of a model's multimodal config (`serving/multimodal/inputs.py`), with the
    defaults of a model whose prompt marks each image with one `image_token_id` and that takes no video.
    A subclass holds `image_token_id` and defines `placeholder_ids`."""

    image_token_id: int
    video_token_id: int | None = None  # the placeholder of a video's rows (None: the model takes no video)

    # Fields naming prompt tokens that only the tokenizer knows (field -> token text), set by `with_tokenizer`.
    prompt_tokens: ClassVar[dict[str, str]] = {}
    # Why the serving engine refuses this model (None: it serves it).
    serving_refusal: ClassVar[str | None] = None
    # Images per prompt when the server is not told (None: serving's default, `DEFAULT_IMAGES_PER_PROMPT`).
    default_image_limit: ClassVar[int | None] = None

    def with_image_limit(self, limit: int) -> "ImagePlaceholders":
        """This config for serving prompts of at most `limit` images (Mllama sizes its cross-attention pools by it)."""
        return self

    def cross_cache_spec(self, config: Any, layer: int) -> Any:
        """The serving state (`model_lib/cache_spec.py`) of decoder layer `layer` if it reads the images by cross
        attention (Mllama's `CrossKV`); None for the others (`config`: the `ModelConfig`)."""
        return None

    def with_tokenizer(self, tokenizer: Any) -> "ImagePlaceholders":
        """This config with the `prompt_tokens` ids looked up in the checkpoint's tokenizer."""
        ids = {}
        for name, text in self.prompt_tokens.items():
            token = tokenizer.convert_tokens_to_ids(text)
            if token is None or token == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {text} token, which the image placeholders need")
            ids[name] = token
        return dataclasses.replace(self, **ids) if ids else self

    def with_processor(self, processor: Any) -> "ImagePlaceholders":
        """This config with what the placeholders need of the checkpoint's image processor (Llama 4: its tiling)."""
        return self

    def video_placeholder_ids(self, frames: Any) -> list[int]:
        """The tokens one video (its preprocessed frames) takes in the prompt."""
        raise ValueError("this model takes no video")

    # Whether each image's run of placeholders attends to itself in both directions (Gemma 3), the rest causal.
    bidirectional_images: ClassVar[bool] = False

    def prompt_text(self, text: str) -> str:
        """A text prompt as the model's processor rewrites it before tokenizing (default: unchanged)."""
        return text

    def check_processor(self, processor: Any) -> None:
        """ValueError if the checkpoint's image processor is set to something serving does not reproduce."""

    def pixels_for(self, pixels: Any, images_in_prompt: int) -> Any:
        """The pixels an image is encoded from, given how many images its prompt has."""
        return pixels

    @property
    def max_image_tokens(self) -> int | None:
        """The most placeholder tokens one image can take (what an encoder budget must hold); None when only the
        image processor bounds it (then each request's images are checked against the budget)."""
        return None

    @property
    def prompt_token_id(self) -> int:
        """The token a prompt marks an image with (one per image, expanded by `placeholder_ids`)."""
        return self.image_token_id

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        """The tokens one image takes in the prompt, given its preprocessed pixels and original (height, width);
        the `image_token_id` positions take the feature rows in order."""
        raise NotImplementedError


@dataclass(frozen=True)
class MultiModalConfig(ImagePlaceholders):
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
    video_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.feature_strategy not in FEATURE_STRATEGIES:
            raise ValueError(f"unknown vision_feature_select_strategy {self.feature_strategy!r}; "
                             f"expected one of {FEATURE_STRATEGIES}")
        depth = self.vision.num_layers
        if not self.feature_layers or any(not -depth - 1 <= layer <= depth for layer in self.feature_layers):
            raise ValueError(f"vision_feature_layer {list(self.feature_layers)} out of range for {depth} layers")

    @property
    def image_tokens(self) -> int:
        """Feature rows per image (or per tile, for the tiling models): "default" drops the first token."""
        return self.vision.tokens - (self.feature_strategy == "default")

    @property
    def max_image_tokens(self) -> int:
        return self.image_tokens

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The pixels of one image of the tower's own size, as `encode` takes them."""
        v = self.vision
        return (v.num_channels, v.image_size, v.image_size)

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        return [self.image_token_id] * self.image_tokens

    @property
    def deepest_layer(self) -> int:
        """How many encoder layers the selected features need."""
        return max(layer % (self.vision.num_layers + 1) for layer in self.feature_layers)
