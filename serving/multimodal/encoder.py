"""The encoder side of a serving step: image features computed once, handed to the step, dropped.

The scheduler admits at most `budget` encoder output tokens per step (`encoder_cut`); before a
step runs, `ImageEncoder.merged` encodes the images its chunks reach that have no features yet
(the model's `encode`, jitted once per pixel shape, then its `arrange` for the image's size;
`model_lib/vision/vlm.py`) and lays the rows the chunks cover out as
`MergedEmbeddings` over the step's `[T_pad]` tokens (a DeepStack model's `[K, T_pad, E]` sets with them,
so a step's shapes stay fixed). An item's features stay on the host until
every sequence of its request has prefilled past it (chunked prefill may split an image over
steps), and are encoded again after a preemption that needs them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.vision.merge import MergedEmbeddings
from model_lib.vision.mllama import MllamaConfig
from model_lib.vision.qwen_vl import QwenVLConfig
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence as Seq
from serving.multimodal.inputs import ImageItem, refuse_unserved


MAX_ENCODER_BUDGET = 1 << 20  # a bound on max_num_encoder_input_tokens


def _encode(encode, config, graphdef, state, pixel_values):
    return encode(config, nnx.merge(graphdef, state), pixel_values)


class ImageEncoder:
    """Runs a vision-language model's `encode` and `arrange` for the engine."""

    def __init__(self, model: nnx.Module, budget: int):
        self.config = model.config.multimodal
        self.budget = budget
        self.hidden_size = model.config.hidden_size
        self.feature_sets = 1  # an image row's sets of features: the embeddings, then DeepStack's (Qwen3-VL)
        self.dtype = jnp.dtype(model.config.dtype)
        # The vision modules only: the runner may hold the language model in another (scanned) layout.
        self.graphdef, self.state = nnx.split(model.vision_modules())
        self._arrange = type(model).arrange
        self._encode = jax.jit(partial(_encode, type(model).encode, self.config))
        self._encode_video = jax.jit(partial(_encode, type(model).encode_video, self.config))
        self.num_encoded = 0  # images run through the tower (a preempted request may count twice)

    def encode(self, item: ImageItem) -> None:
        if item.video:
            item.features = np.asarray(self._encode_video(self.graphdef, self.state, jnp.asarray(item.pixel_values)))
            self.num_encoded += 1
            return
        encoded = self._encode(self.graphdef, self.state, jnp.asarray(item.pixel_values))
        modules = nnx.merge(self.graphdef, self.state)
        item.features = np.asarray(self._arrange(self.config, modules, encoded, item.image_size))
        self.num_encoded += 1

    def encoder_len(self, items: Sequence[ImageItem]) -> int:
        """Encoder rows a request's images cost all at once when its sequence starts (0: each image is charged
        when a chunk first reaches it, `encoder_cut`)."""
        return 0

    def fill(self, runner: Any, scheduled: Sequence[ScheduledSequence]) -> None:
        """Write per-slot image state before a step (Mllama's cross-attention pools); nothing here."""

    def warm_up(self, runner: Any) -> None:
        """Compile the encoder for the tower's own square image (one tile of a tiling model; other shapes
        compile when they first come)."""
        pixels = jnp.zeros(self.config.pixel_shape, jnp.float32)
        jax.block_until_ready(self._encode(self.graphdef, self.state, pixels))

    def check_fits(self, items: Sequence[ImageItem]) -> None:
        """ValueError for an image longer than the per-step encoder budget (it could never be scheduled)."""
        for item in items:
            if item.length > self.budget:
                raise ValueError(f"an image of {item.length} tokens exceeds the encoder budget of {self.budget} "
                                 "tokens per step (max_num_encoder_input_tokens)")

    def empty(self, token_pad: int) -> MergedEmbeddings:
        """A merge that replaces nothing, in the step's shapes (what warm-up compiles)."""
        rows = np.zeros((token_pad, self.feature_sets * self.hidden_size), self.dtype)
        return MergedEmbeddings.from_sets(rows, np.full(token_pad, -1, np.int32), self.hidden_size)

    def merged(self, scheduled: Sequence[ScheduledSequence], token_pad: int) -> MergedEmbeddings | None:
        """The step's image rows, row t for flat token t (None when no chunk reaches an image)."""
        embeds, index = None, None
        offset = 0
        for item in scheduled:
            seq, start, count = item.seq, item.seq.num_computed, item.num_new_tokens
            for image in seq.images:
                lo, hi = max(start, image.offset), min(start + count, image.end)
                if lo >= hi:
                    continue
                if image.features is None:
                    self.encode(image)
                if embeds is None:
                    embeds = np.zeros((token_pad, self.feature_sets * self.hidden_size), self.dtype)
                    index = np.full(token_pad, -1, np.int32)
                rows = slice(offset + lo - start, offset + hi - start)
                span = np.arange(lo - image.offset, hi - image.offset)
                feature = span if image.rows is None else image.rows[span]
                embeds[rows] = image.features[np.maximum(feature, 0)]
                index[rows] = np.where(feature >= 0, np.arange(rows.start, rows.stop, dtype=np.int32), -1)
            offset += count
        return None if embeds is None else MergedEmbeddings.from_sets(embeds, index, self.hidden_size)


def release_prefilled(sequences: Iterable[Seq]) -> None:
    """Drop the features of images that every given sequence (one request's) has prefilled past."""
    sequences = list(sequences)
    for image in sequences[0].images if sequences else ():
        if image.features is not None and all(s.num_computed >= image.end or s.finished for s in sequences):
            image.features = None


def image_encoder(model: nnx.Module, budget: int | None, max_num_batched_tokens: int) -> ImageEncoder | None:
    """The engine's image encoder (None for a text-only model), under a checked per-step budget."""
    mm = model.config.multimodal
    if mm is None:
        return None
    refuse_unserved(model.config)
    cross = isinstance(mm, MllamaConfig)  # cross attention: every image of a request runs at its first step
    least = mm.image_rows if cross else mm.max_image_tokens or 1  # None: lengths vary, `check_fits` per request
    default = max(max_num_batched_tokens, mm.max_images * least if cross else least)
    budget = default if budget is None else budget
    if not least <= budget <= MAX_ENCODER_BUDGET:
        raise ValueError(f"max_num_encoder_input_tokens must be in [{least} (one image), "
                         f"{MAX_ENCODER_BUDGET}], got {budget}")
    if cross:
        from serving.multimodal.mllama import MllamaImageEncoder  # it builds on this module

        return MllamaImageEncoder(model, budget)
    if isinstance(mm, QwenVLConfig):  # a tower call per image grid, no `encode`/`arrange`
        from serving.multimodal.qwen_vl import QwenImageEncoder  # it builds on this module

        return QwenImageEncoder(model, budget)
    return ImageEncoder(model, budget)
