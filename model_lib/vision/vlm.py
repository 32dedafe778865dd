"""The contract between a vision-language model and the code that feeds it images.

A `VisionLanguageModel` is a `CausalLM` (its `model` is the language model) that also holds
the vision modules named by `vision_parts`. One image becomes feature rows in two steps, so
that a server can compile the first once per pixel shape and hold the vision modules without
the language model:
- `encode(mm, modules, pixels)`: the image's preprocessed pixels (the processor's output for
  that image, e.g. `[C, H, W]` or `[N, C, H, W]` tiles) -> whatever the tower and projector
  make of them; pure in the array shapes, jitted by the caller;
- `arrange(mm, modules, encoded, image_size)`: -> the rows `[F, E]` the image's `image_token_id`
  placeholders take in order (F from `mm.placeholder_ids`); may depend on the original
  (height, width), so it runs eagerly.

The dense `__call__` takes `pixel_values` (one array per image, in placeholder order) and
`image_sizes` and builds the `MergedEmbeddings` itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.decoder import CausalLM, positions_from_segments
from model_lib.spans import visible_until_from_span_ids
from model_lib.vision.config import MultiModalConfig
from model_lib.vision.merge import MergedEmbeddings, placeholder_index


class VisionLanguageModel(CausalLM):
    """A decoder whose `image_token_id` placeholders take the rows of its vision modules."""

    vision_parts: tuple[str, ...] = ("vision_tower", "multi_modal_projector")
    mm_class: type[MultiModalConfig] = MultiModalConfig  # what `config.multimodal` must be
    tower_class: type[nnx.Module]
    projector_class: type[nnx.Module]

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        """The language model, the tower (`tower_class`) and the projector (`projector_class`), under the first two
        `vision_parts` names (`vision_tower` and `multi_modal_projector` unless the checkpoint names them otherwise)."""
        if not isinstance(config.multimodal, self.mm_class):
            raise ValueError(f"{config.architecture} needs a vision configuration ({self.mm_class.__name__})")
        super().__init__(config, rngs=rngs)
        tower, projector = self.vision_parts[:2]
        setattr(self, tower, self.tower_class(config.multimodal.vision, jnp.dtype(config.dtype), rngs=rngs))
        setattr(self, projector, self.projector_class(config, rngs=rngs))

    def vision_modules(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.vision_parts)

    @staticmethod
    def encode(mm: MultiModalConfig, modules: tuple[Any, ...], pixels: jax.Array) -> jax.Array:
        raise NotImplementedError

    @staticmethod
    def encode_video(mm: MultiModalConfig, modules: tuple[Any, ...], frames: jax.Array) -> jax.Array:
        """A video's preprocessed frames `[F, C, H, W]` -> the rows `[F', E]` of its `video_token_id` placeholders."""
        raise ValueError("this model takes no video")

    @staticmethod
    def arrange(mm: MultiModalConfig, modules: tuple[Any, ...], encoded: jax.Array,
                image_size: tuple[int, int]) -> jax.Array:
        return encoded.reshape(-1, encoded.shape[-1])

    def image_rows(self, pixels: Any, image_size: tuple[int, int]) -> jax.Array:
        """One image's preprocessed pixels -> its placeholder rows `[F, E]`."""
        mm, modules = self.config.multimodal, self.vision_modules()
        return self.arrange(mm, modules, self.encode(mm, modules, jnp.asarray(pixels)), image_size)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        pixel_values: Sequence[Any] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        pixel_values_videos: Sequence[Any] | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        merged: MergedEmbeddings | None = None,
    ) -> jax.Array:
        """Logits for a `[B, T]` batch whose image placeholders take the images of `pixel_values` in order, and
        whose video placeholders the videos of `pixel_values_videos` (`[F, C, H, W]` frames each)."""
        if pixel_values is not None or pixel_values_videos is not None:
            if merged is not None:
                raise ValueError("pass pixel_values or merged features, not both")
            merged = self._merged(jnp.asarray(input_ids, jnp.int32), pixel_values or [], image_sizes,
                                  pixel_values_videos or [])
        return CausalLM.__call__(self, input_ids, attention_mask, segment_ids=segment_ids, positions=positions,
                                 merged=merged, visible_until=self.image_spans(input_ids, attention_mask, segment_ids,
                                                                               positions))

    def image_spans(self, input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None,
                    positions: jax.Array | None) -> jax.Array | None:
        """`visible_until [B, T]` making each run of image placeholders a bidirectional span
        (`model_lib/spans.py`), for a model whose image tokens attend to each other both ways (Gemma 3, as
        transformers' `token_type_ids`); None for the others."""
        if not self.config.multimodal.bidirectional_images:
            return None
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if positions is None:
            segments = segment_ids if segment_ids is not None else attention_mask
            positions = positions_from_segments(jnp.ones_like(input_ids) if segments is None else jnp.asarray(segments))
        is_image = (input_ids == self.config.multimodal.image_token_id).astype(jnp.int32)
        return visible_until_from_span_ids(is_image, positions)


    def _merged(self, input_ids: jax.Array, pixel_values: Sequence[Any], image_sizes: Sequence | None,
                videos: Sequence[Any]) -> MergedEmbeddings:
        mm, modules = self.config.multimodal, self.vision_modules()
        sizes = [None] * len(pixel_values) if image_sizes is None else image_sizes
        if len(sizes) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images and {len(sizes)} image sizes")
        rows = [self.image_rows(p, None if s is None else tuple(int(v) for v in s)) for p, s in zip(pixel_values, sizes)]
        rows += [self.encode_video(mm, modules, jnp.asarray(frames)) for frames in videos]
        index = placeholder_index(input_ids, mm.image_token_id)
        if videos:
            image_rows = sum(r.shape[0] for r in rows[: len(pixel_values)])
            video = placeholder_index(input_ids, mm.video_token_id)
            index = jnp.where(video >= 0, video + image_rows, index)
        return MergedEmbeddings(jnp.concatenate(rows, axis=0), index)


class LearnedRow(nnx.Module):
    """A learned `[E]` row that checkpoints keep as a bare model-level tensor (LLaVA-NeXT's `image_newline`),
    held as `weight` of a module so that it has a module path and travels with the vision modules."""

    def __init__(self, size: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (size,), dtype) / size**0.5)
