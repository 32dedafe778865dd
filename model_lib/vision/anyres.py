"""Any-resolution tiling (LLaVA-NeXT, LLaVA-OneVision): an image is a base view plus a grid of tiles.

The processor picks the grid resolution from `image_grid_pinpoints` that keeps most of the image,
resizes and pads the image into it and cuts tiles of the tower's input size. The model lays the
tiles' feature maps side by side, crops away the rows or columns that only saw padding
("unpadding"), optionally shrinks the map (OneVision's `anyres_max_N`), appends a learned
`image_newline` row after every feature row, and puts the base view's features first.

`AnyResConfig` computes every size from the original (height, width) alone, so the placeholder
count is known before the tower runs; `pack` arranges the features by the same numbers.

Glossary: N tiles (base view first), S feature rows per tile, s = sqrt(S) their side, E text width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model_lib.vision.config import MultiModalConfig

MAX_GRID_TILES = 64  # a bound on the tiles of one grid pinpoint
MAX_VIDEO_FRAMES = 256  # a bound on the frames of one video
TAPS = 4  # table rows one packed row mixes: 1, or 2x2 where the map shrinks (bilinear)
_LAYOUT_CHUNK = 1024  # one-hot table rows run through `pack` at a time (bounds its memory)


def best_resolution(image_size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The pinpoint (height, width) that the processor resizes the image into."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(tuple(image_size), [list(p) for p in pinpoints]))


@dataclass(frozen=True)
class AnyResConfig(MultiModalConfig):
    """LLaVA's settings plus the tiling: `grid_pinpoints` (height, width) resolutions and `anyres_max` (OneVision:
    shrink the unpadded map to at most that many tiles' worth of rows; None for LLaVA-NeXT). OneVision's videos:
    each frame's rows pooled to `ceil(side / 2)` squared, then one newline row for the whole video."""

    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    anyres_max: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        side = self.vision.image_size
        if not self.grid_pinpoints:
            raise ValueError("image_grid_pinpoints is empty")
        for h, w in self.grid_pinpoints:
            if h <= 0 or w <= 0 or h % side or w % side or (h // side) * (w // side) > MAX_GRID_TILES:
                raise ValueError(f"image_grid_pinpoints entry {[h, w]} must be positive multiples of the tower's "
                                 f"image_size {side}, at most {MAX_GRID_TILES} tiles")
        if self.anyres_max is not None and not 0 < self.anyres_max <= MAX_GRID_TILES:
            raise ValueError(f"vision_aspect_ratio anyres_max_{self.anyres_max} must be in [1, {MAX_GRID_TILES}]")
        if self.image_tokens != self.side**2:
            raise ValueError(f"tiling needs a square feature map per tile; {self.image_tokens} rows "
                             f"(vision_feature_select_strategy {self.feature_strategy!r})")

    @property
    def side(self) -> int:
        """Feature rows along one side of a tile."""
        return self.vision.image_size // self.vision.patch_size

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tiles for an image of this (height, width)."""
        h, w = best_resolution(image_size, self.grid_pinpoints)
        return h // self.vision.image_size, w // self.vision.image_size

    def feature_map(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """((height, width) of the tiled map, (top, left) of the unpadded crop, (height, width) after any shrink)."""
        rows, cols = self.grid(image_size)
        height, width = rows * self.side, cols * self.side
        orig_h, orig_w = image_size
        top = left = 0
        if orig_w / orig_h > width / height:
            top = (height - int(round(orig_h * (width / orig_w), 7))) // 2
        else:
            left = (width - int(round(orig_w * (height / orig_h), 7))) // 2
        crop_h, crop_w = height - 2 * top, width - 2 * left
        out_h, out_w = crop_h, crop_w
        if self.anyres_max is not None:
            ratio = math.sqrt(crop_h * crop_w / (self.anyres_max * self.side**2))
            if ratio > 1.1:
                out_h, out_w = int(crop_h // ratio), int(crop_w // ratio)
        return (height, width), (top, left), (out_h, out_w)

    def image_rows(self, image_size: tuple[int, int]) -> int:
        """Feature rows of one image: the base view, then the map with a newline after each row."""
        _, _, (h, w) = self.feature_map(image_size)
        return self.image_tokens + h * (w + 1)

    def placeholder_ids(self, pixels: Any, image_size: tuple[int, int]) -> list[int]:
        rows = self.image_tokens + 1 if len(pixels) == 1 else self.image_rows(image_size)
        return [self.image_token_id] * rows

    def layout(self, pixels: Any, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """`pack_layout` for one image's preprocessed pixels (padding tiles beyond its grid ignored)."""
        rows, cols = self.grid(image_size)
        return pack_layout(self, 1 if len(pixels) == 1 else 1 + rows * cols, image_size)

    @property
    def pooled_side(self) -> int:
        """Rows along one side of a video frame's pooled map."""
        return math.ceil(self.side / 2)

    def video_placeholder_ids(self, frames: Any) -> list[int]:
        if self.video_token_id is None:
            raise ValueError("this model takes no video")
        if not 0 < len(frames) <= MAX_VIDEO_FRAMES:
            raise ValueError(f"a video has 1 to {MAX_VIDEO_FRAMES} frames, got {len(frames)}")
        return [self.video_token_id] * (len(frames) * self.pooled_side**2 + 1)

    def pixels_for(self, pixels: Any, images_in_prompt: int) -> Any:
        """OneVision tiles an image only when it is its prompt's one image; otherwise the base view alone
        (and one newline row) stands for it."""
        return pixels[:1] if self.anyres_max is not None and images_in_prompt > 1 else pixels

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (1, *super().pixel_shape)

    @property
    def max_image_tokens(self) -> int:
        side = self.side
        return self.image_tokens + max((h // self.vision.image_size * side) * (w // self.vision.image_size * side + 1)
                                       for h, w in self.grid_pinpoints)


def bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """`[h, w, E]` -> `[height, width, E]`, as torch's `interpolate(mode="bilinear", align_corners=False)`
    (half-pixel centres, no antialiasing)."""
    return jax.image.resize(x, (height, width, x.shape[-1]), "bilinear", antialias=False)


def pack(mm: AnyResConfig, features: jax.Array, newline: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Tile features `[N, S, E]` of one image -> its rows `[mm.image_rows(image_size), E]` (a lone base view:
    its rows and one newline)."""
    base, tiles = features[0], features[1:]
    if not len(tiles):
        return jnp.concatenate([base, newline.astype(base.dtype)[None]], axis=0)
    rows, cols = mm.grid(image_size)
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"an image of size {list(image_size)} needs {rows * cols + 1} tiles, got {features.shape[0]}")
    (height, width), (top, left), (out_h, out_w) = mm.feature_map(image_size)
    s, e = mm.side, features.shape[-1]
    grid = tiles.reshape(rows, cols, s, s, e).transpose(0, 2, 1, 3, 4).reshape(height, width, e)
    grid = grid[top : height - top, left : width - left]
    if (out_h, out_w) != grid.shape[:2]:
        grid = bilinear(grid, out_h, out_w)
    lines = jnp.broadcast_to(newline.astype(grid.dtype), (out_h, 1, e))
    return jnp.concatenate([base, jnp.concatenate([grid, lines], axis=1).reshape(-1, e)], axis=0)


def pool_frames(mm: AnyResConfig, features: jax.Array, newline: jax.Array) -> jax.Array:
    """A video's frame features `[F, S, E]` -> its rows: each frame's map shrunk (bilinear) to the pooled side,
    frames in order, then one newline row."""
    f, s, e = features.shape[0], mm.side, features.shape[-1]
    pooled = jax.vmap(lambda x: bilinear(x, mm.pooled_side, mm.pooled_side))(features.reshape(f, s, s, e))
    return jnp.concatenate([pooled.reshape(-1, e), newline.astype(pooled.dtype)[None]], axis=0)


def pack_layout(mm: AnyResConfig, tiles: int, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`pack` as a weighted gather, on the host: (sources `[R, TAPS]` int32, weights `[R, TAPS]` float32) with packed
    row r = sum_k weights[r, k] * table[sources[r, k]], table = [newline; the tiles' features `[N * S]` in order]
    (unused taps: row 0, weight 0). `pack` is linear and acts on each feature column alike, so running it on one-hot
    columns gives the weights exactly; the trainer then arranges images of any size in one jitted step."""
    size = tiles * mm.image_tokens + 1
    taps: list[list[tuple[int, float]]] = []
    for start in range(0, size, _LAYOUT_CHUNK):
        width = min(_LAYOUT_CHUNK, size - start)
        onehot = np.zeros((size, width), np.float32)
        onehot[start + np.arange(width), np.arange(width)] = 1.0
        packed = np.asarray(pack(mm, jnp.asarray(onehot[1:].reshape(tiles, mm.image_tokens, width)),
                                 jnp.asarray(onehot[0]), image_size))  # [R, width]
        taps = taps or [[] for _ in range(len(packed))]
        for r, c in zip(*np.nonzero(packed)):
            taps[r].append((start + int(c), float(packed[r, c])))
    if max(map(len, taps)) > TAPS:
        raise ValueError(f"a packed row mixes {max(map(len, taps))} feature rows; at most {TAPS}")
    sources, weights = np.zeros((len(taps), TAPS), np.int32), np.zeros((len(taps), TAPS), np.float32)
    for r, row in enumerate(taps):
        for k, (source, weight) in enumerate(row):
            sources[r, k], weights[r, k] = source, weight
    return sources, weights


def gather_packed(encoded: jax.Array, newline: jax.Array, sources: jax.Array, weights: jax.Array) -> jax.Array:
    """Tile features `[N, S, E]` -> packed rows `[R, E]` by a `pack_layout` (rows of zero weights: zeros)."""
    table = jnp.concatenate([newline.astype(encoded.dtype)[None], encoded.reshape(-1, encoded.shape[-1])], axis=0)
    return jnp.einsum("rk,rke->re", weights.astype(table.dtype), table[sources])
