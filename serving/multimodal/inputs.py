"""A prompt's images: placeholder expansion and the per-image record the engine keeps.

A prompt marks each image with one `prompt_token_id` (LLaVA's `image_token_id`); the model needs
one `image_token_id` per feature row, so the marker is replaced by the tokens
`ImagePlaceholders.placeholder_ids` gives for that image (as transformers' processors do in the
text; the count may depend on the image's size, and the run may hold other tokens such as row
breaks). A run of exactly the image's placeholder tokens is taken as already expanded. Each image
then owns the token range `[offset, offset + length)` of the prompt; its `image_token_id`
positions take its feature rows in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from model_lib.vision.config import ImagePlaceholders
from serving.multimodal.images import pixel_hash, preprocess

MAX_IMAGES_PER_PROMPT = 256  # a bound on `limit_mm_per_prompt`


@dataclass(eq=False)
class ImageItem:
    """One image of a request: where its placeholders sit, its pixels, and its features while needed."""

    offset: int
    length: int
    hash: str
    # The processor's float32 pixels for this image ([C, H, W], or tiles [N, C, H, W]; Qwen-VL: patch rows by
    # grid, [t, h, w, C*Tp*P*P]).
    pixel_values: np.ndarray
    features: np.ndarray | None = None  # [rows, E] once encoded, dropped when every placeholder has KV
    image_size: tuple[int, int] = (0, 0)  # the original (height, width)
    # Per token of the range: its feature row, or -1 for a token that keeps its embedding (a row break);
    # None when token k takes row k.
    rows: np.ndarray | None = None
    video: bool = False  # frames `[F, C, H, W]` in `pixel_values`, encoded by the model's `encode_video`

    @property
    def end(self) -> int:
        return self.offset + self.length

    def feature_positions(self) -> list[int]:
        """Prompt positions that take feature rows."""
        if self.rows is None:
            return list(range(self.offset, self.end))
        return [self.offset + int(k) for k in np.flatnonzero(self.rows >= 0)]


def refuse_unserved(config: Any) -> None:
    """ValueError naming a vision-language model (`config`: its `ModelConfig`) the engine cannot serve yet."""
    mm = config.multimodal
    if mm is not None and mm.serving_refusal:
        raise ValueError(f"{config.architecture} cannot be served yet: {mm.serving_refusal}")


def feature_rows(placeholders: Sequence[int], image_token_id: int) -> np.ndarray | None:
    """`ImageItem.rows` for an image's placeholder tokens."""
    is_row = np.asarray(placeholders) == image_token_id
    if is_row.all():
        return None
    return np.where(is_row, np.cumsum(is_row) - 1, -1).astype(np.int32)


def placeholder_runs(ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of `token_id` in `ids`."""
    runs, start = [], None
    for i, t in enumerate(ids):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(ids) - start))
    return runs


class ImageInputs:
    """Prompt ids plus images -> expanded ids and one `ImageItem` per image (for one model)."""

    def __init__(self, config: ImagePlaceholders, processor: Any, limit_per_prompt: int, video_limit: int = 0):
        for kind, limit in (("image", limit_per_prompt), ("video", video_limit)):
            if not 0 <= limit <= MAX_IMAGES_PER_PROMPT:
                raise ValueError(f"limit_mm_per_prompt {kind} must be in [0, {MAX_IMAGES_PER_PROMPT}], got {limit}")
        config.check_processor(processor)
        self.config = config.with_processor(processor)
        self.processor = processor
        self.limit = limit_per_prompt
        self.video_limit = video_limit

    def check_count(self, count: int, kind: str = "image") -> None:
        limit = self.video_limit if kind == "video" else self.limit
        if count > limit:
            raise ValueError(f"the prompt has {count} {kind}s; at most {limit} per prompt (--limit-mm-per-prompt)")

    def prompt_text(self, prompt: Any) -> Any:
        """A text prompt with images as the model's processor rewrites it before tokenizing (Gemma 3 expands its
        image markers there); token ids and dict prompts unchanged."""
        return self.config.prompt_text(prompt) if isinstance(prompt, str) else prompt

    def preprocess(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (its pixels as the encoder takes them, its original (height, width))."""
        return preprocess(self.processor, image)

    def __call__(self, prompt_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], list[ImageItem]]:
        """`images` may hold `Video`s, which pair with the video placeholders. ValueError when the images and the
        prompt's placeholders do not pair up, or an image is bad."""
        videos = [v for v in images if isinstance(v, Video)]
        images = [i for i in images if not isinstance(i, Video)]
        if videos and self.config.video_token_id is None:
            raise ValueError("multi_modal_data has a video, and this model takes no video")
        self.check_count(len(images))
        self.check_count(len(videos), "video")
        marked = self._paired(prompt_ids, self.config.prompt_token_id, images, "image")
        if videos:
            marked += self._paired(prompt_ids, self.config.video_token_id, videos, "video")
        ids: list[int] = []
        items: list[ImageItem] = []
        cursor = 0
        for start, length, media in sorted(marked, key=lambda m: m[0]):
            if isinstance(media, Video):
                pixels, image_size = media.pixels(self.processor), (0, 0)
                placeholders, token = self.config.video_placeholder_ids(pixels), self.config.video_token_id
            else:
                pixels, image_size = self.preprocess(media)
                pixels = self.config.pixels_for(pixels, len(images))
                placeholders, token = self.config.placeholder_ids(pixels, image_size), self.config.image_token_id
            if length != 1 and list(prompt_ids[start : start + length]) != placeholders:
                raise ValueError(f"an image placeholder run of {length} tokens; expected 1 or {len(placeholders)}")
            ids += prompt_ids[cursor:start]
            items.append(ImageItem(len(ids), len(placeholders), pixel_hash(pixels, image_size), pixels,
                                   image_size=image_size, rows=feature_rows(placeholders, token),
                                   video=isinstance(media, Video)))
            ids += placeholders
            cursor = start + length
        ids += prompt_ids[cursor:]
        return ids, items

    @staticmethod
    def _paired(prompt_ids: Sequence[int], token: int, media: list, kind: str) -> list[tuple[int, int, Any]]:
        runs = placeholder_runs(prompt_ids, token)
        if len(runs) != len(media):
            raise ValueError(f"the prompt has {len(runs)} {kind} placeholder(s) and {len(media)} {kind}(s) were given")
        return [(start, length, m) for (start, length), m in zip(runs, media)]


@dataclass(frozen=True)
class Video:
    """A video as a list of frames (each what an image may be), as `multi_modal_data={"video": frames}` gives it."""

    frames: Sequence[Any]

    def pixels(self, processor: Any) -> np.ndarray:
        """`[F, C, H, W]`: each frame as the image processor makes it (a tiling processor's base view)."""
        if not len(self.frames):
            raise ValueError("a video needs at least one frame")
        frames = [preprocess(processor, frame)[0] for frame in self.frames]
        return np.stack([f[0] if f.ndim == 4 else f for f in frames])


def check_placeholders(prompt_ids: Sequence[int], items: Sequence[ImageItem], config: ImagePlaceholders | None) -> None:
    """ValueError unless every image placeholder of the prompt belongs to exactly one item."""
    if config is None:
        if items:
            raise ValueError("this model takes no images")
        return
    for token, video in ((config.image_token_id, False), (config.video_token_id, True)):
        placeholders = [i for i, t in enumerate(prompt_ids) if t == token]
        if placeholders != [p for item in items if item.video == video for p in item.feature_positions()]:
            raise ValueError(f"the prompt's {'video' if video else 'image'} placeholders "
                             f"{placeholder_runs(prompt_ids, token)} do not match its {len(items)} image(s) and "
                             "video(s) (pass them with the prompt, one placeholder each)")


def image_spans(items: Sequence[ImageItem], config: ImagePlaceholders | None) -> list[tuple[int, int]]:
    """The bidirectional spans (`serving/engine/spans.py`) of a prompt's images: each image's placeholder run, for a
    model whose image tokens attend to each other both ways (Gemma 3); none for the others."""
    if config is None or not config.bidirectional_images:
        return []
    return [(item.offset, item.end) for item in items]


def page_tags(items: Sequence[ImageItem], page_size: int) -> Callable[[int], tuple]:
    """For prefix-cache keys: page index -> a tag naming the hashes of the images overlapping that page."""

    def tags(page: int) -> tuple:
        start, end = page * page_size, (page + 1) * page_size
        hashes = tuple(item.hash for item in items if item.offset < end and item.end > start)
        return (("image", *hashes),) if hashes else ()

    return tags


def encoder_cut(items: Sequence[ImageItem], start: int, num_new: int, budget: int) -> tuple[int, int]:
    """(tokens to schedule, encoder tokens spent) for the chunk `[start, start + num_new)`.

    Images the chunk reaches whose features are not computed cost their length; the chunk
    stops before the first one that no longer fits in `budget`.
    """
    spent = 0
    for item in items:
        if item.end <= start or item.offset >= start + num_new or item.features is not None:
            continue
        if spent + item.length > budget:
            return max(0, item.offset - start), spent
        spent += item.length
    return num_new, spent
