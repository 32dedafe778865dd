"""Images as callers send them -> preprocessed pixel arrays, with the checkpoint's image processor.

transformers 5 names its torchvision processors `CLIPImageProcessor` and the like and the PIL
ones `*Pil`; `AutoImageProcessor` falls back to the PIL class when torchvision is missing (it
is not installed here), and reads `preprocessor_config.json` (hub checkpoints) or the image
settings inside `processor_config.json` (what `processor.save_pretrained` writes).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a bound on a decoded image (width x height), against decompression bombs


def decode_image(data: bytes) -> Any:
    """Encoded image bytes (PNG, JPEG, ...) -> an RGB PIL image; ValueError if they are not an image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"the image is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels")
            image.load()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data
        raise ValueError(f"cannot decode the image: {e}") from None
    return image.convert("RGB")


def to_rgb(image: Any) -> Any:
    """A PIL image, a `[H, W, 3]` uint8 array or encoded bytes -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8, got {list(image.shape)} {image.dtype}")
        return Image.fromarray(image, "RGB")
    raise ValueError(f"an image is a PIL image, a [H, W, 3] uint8 array or encoded bytes, got {type(image).__name__}")


def load_image_processor(path: str | Path) -> Any:
    """The checkpoint's image processor (PIL backend; Llama 4's, which transformers has only for torchvision,
    in numpy); ValueError if the folder has no image settings."""
    from transformers import AutoImageProcessor

    from serving.multimodal.llama4_images import Llama4ImageTiler, is_llama4_processor

    path = Path(path)
    files = [path / name for name in PROCESSOR_FILES if (path / name).is_file()]
    if not files:
        raise ValueError(f"{path} has no image processor settings ({' or '.join(PROCESSOR_FILES)})")
    if is_llama4_processor(files[0]):
        return Llama4ImageTiler.from_file(files[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision -> PIL fallback notice
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def preprocess(processor: Any, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (its float32 pixels as the model takes them: `[C, H, W]`, or `[N, C, H, W]` tiles for
    the tiling processors), and its original (height, width)."""
    rgb = to_rgb(image)
    out = processor(images=[rgb], return_tensors="np")
    # Tiling processors that flatten every image's tiles into one batch (InternVL's) say how many are whose.
    pixels = out["pixel_values"] if "num_patches" in out else out["pixel_values"][0]
    return np.asarray(pixels, np.float32), (rgb.height, rgb.width)


def pixel_hash(pixels: np.ndarray, image_size: tuple[int, int] = (0, 0)) -> str:
    """A content hash of preprocessed pixels (shape and original size included): equal hashes, equal
    encoder outputs."""
    digest = hashlib.sha256(f"{pixels.shape} {tuple(image_size)}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()
