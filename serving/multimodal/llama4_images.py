"""Llama 4's image preprocessing in numpy: transformers ships only a torchvision processor for it
(`Llama4ImageProcessor`), which serving must not need, so its steps are reproduced here bit for bit.

Per image (uint8 RGB): pick the tile grid (`model_lib.vision.llama4.tile_grid`), resize without distortion
into the canvas (never upscaling past one tile's side unless `resize_to_max_canvas`), pad right and bottom
with zeros, rescale and normalize in bfloat16 (transformers keeps the original model's precision), cut into
tiles row-major, and when there is more than one tile append the whole image resized to one tile (distorted).

Resizing is torchvision's bilinear antialiased resize of uint8 tensors on the CPU, which runs torch's
integer kernel: separable (horizontal pass first, rounded to uint8, then vertical), PIL-style triangle
weights over `support = scale` source pixels, normalized, quantized to int16 with the largest precision that
keeps the biggest weight below 2^15, sums rounded and clamped. PIL's own resize differs by one level on
some pixels, so it is not used.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from model_lib.vision.llama4 import tile_grid

PROCESSOR_TYPES = ("Llama4ImageProcessor", "Llama4ImageProcessorFast")
BILINEAR = 2  # PIL's code, the only resample transformers' Llama 4 processor is used with
MAX_PRECISION = 22


@lru_cache(maxsize=256)
def _resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(source indices `[out, K]`, int16-valued weights `[out, K]`, precision bits) of one antialiased
    bilinear pass (torch's `_compute_index_ranges_int16_weights`)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    width = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, width), np.int64)
    weights = np.zeros((out_size, width), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), in_size) - lo, 0), width)
        taps = np.arange(size)
        w = np.maximum(0.0, 1.0 - np.abs((taps + lo - center + 0.5) * inv_scale))
        total = w.sum()
        if total != 0.0:
            weights[i, :size] = w / total
        index[i, :size] = lo + taps
    largest = weights.max()
    precision = 0
    while precision < MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return index, np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64), precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    index, weights, precision = _resize_weights(in_size, out_size)
    taps = np.take(image.astype(np.int64), index, axis=axis)  # the axis becomes [out, K]
    shape = [1] * taps.ndim
    shape[axis], shape[axis + 1] = weights.shape
    total = (taps * weights.reshape(shape)).sum(axis=axis + 1) + (1 << (precision - 1))
    return np.clip(total >> precision, 0, 255).astype(np.uint8)


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[C, H, W]` uint8 -> `[C, height, width]` uint8, as torchvision's bilinear antialiased resize on the CPU."""
    return _resize_axis(_resize_axis(image, width, 2), height, 1)


def _fit(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) inside `target` with the image's aspect ratio (transformers'
    `get_max_res_without_distortion`)."""
    (height, width), (target_h, target_w) = image_size, target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return max(min(int(np.floor(height * scale_w)), target_h), 1), max(target_w, 1)
    return max(target_h, 1), max(min(int(np.floor(width * scale_h)), target_w), 1)


def _image_settings(path: Path) -> dict[str, Any]:
    """The image processor's settings in `preprocessor_config.json`, or inside `processor_config.json`."""
    settings = json.loads(path.read_text())
    return settings.get("image_processor", settings)


def is_llama4_processor(path: Path) -> bool:
    return _image_settings(path).get("image_processor_type") in PROCESSOR_TYPES


class Llama4ImageTiler:
    """Llama 4's image processor: `processor(images=[...])` -> `{"pixel_values": [tiles [N, C, T, T] per image],
    "aspect_ratios": [(rows, columns) per image]}`, float32 holding bfloat16 values."""

    def __init__(self, settings: dict[str, Any]):
        size = settings.get("size", {"height": 336, "width": 336})
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(f"the Llama 4 image processor needs a square size {{height, width}}, got {size}")
        unsupported = {k: settings[k] for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
                       if not settings.get(k, True)}
        if unsupported or settings.get("resample", BILINEAR) != BILINEAR:
            raise ValueError(f"Llama 4 image settings {unsupported or {'resample': settings['resample']}} are not "
                             "supported (bilinear resizing, rescaling and normalizing only)")
        self.size = dict(size)
        self.max_patches = int(settings.get("max_patches", 16))
        self.resize_to_max_canvas = bool(settings.get("resize_to_max_canvas", False))
        self.rescale_factor = float(settings.get("rescale_factor", 1 / 255))
        channels = lambda v: np.asarray(v if isinstance(v, (list, tuple)) else [v] * 3, np.float32)  # noqa: E731
        self.image_mean = channels(settings.get("image_mean", [0.5, 0.5, 0.5]))
        self.image_std = channels(settings.get("image_std", [0.5, 0.5, 0.5]))

    @classmethod
    def from_file(cls, path: Path) -> "Llama4ImageTiler":
        return cls(_image_settings(path))

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 `[..., C, H, W]` -> bfloat16 steps as transformers takes them: x * factor, - mean, / std."""
        bf16 = ml_dtypes.bfloat16
        x = (image.astype(np.float32) * np.float32(self.rescale_factor)).astype(bf16)
        mean, std = (v.astype(bf16).astype(np.float32)[:, None, None] for v in (self.image_mean, self.image_std))
        x = (x.astype(np.float32) - mean).astype(bf16)
        return (x.astype(np.float32) / std).astype(bf16).astype(np.float32)

    def tiles(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 `[C, H, W]` -> (tiles `[N, C, T, T]`, (rows, columns))."""
        tile = self.size["height"]
        height, width = image.shape[-2:]
        rows, cols = tile_grid((height, width), tile, self.max_patches, self.resize_to_max_canvas)
        canvas = (rows * tile, cols * tile)
        limit = canvas if self.resize_to_max_canvas else (min(max(height, tile), canvas[0]),
                                                          min(max(width, tile), canvas[1]))
        fitted = resize_uint8(image, *_fit((height, width), limit))
        padded = np.zeros((image.shape[0], *canvas), np.uint8)
        padded[:, : fitted.shape[1], : fitted.shape[2]] = fitted
        pixels = self._normalize(padded)
        c = pixels.shape[0]
        tiles = pixels.reshape(c, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, c, tile, tile)
        if rows * cols > 1:
            tiles = np.concatenate([tiles, self._normalize(resize_uint8(image, tile, tile))[None]])
        return tiles, (rows, cols)

    def __call__(self, images: Sequence[Any], return_tensors: str | None = None, **_: Any) -> dict[str, list]:
        out: dict[str, list] = {"pixel_values": [], "aspect_ratios": []}
        for image in images:
            array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.uint8)
            tiles, grid = self.tiles(array.transpose(2, 0, 1))
            out["pixel_values"].append(tiles)
            out["aspect_ratios"].append(grid)
        return out
