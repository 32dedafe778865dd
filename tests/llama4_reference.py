"""transformers' own Llama 4 image processor and model as test references, where torchvision is missing.

`Llama4ImageProcessor` (transformers 5 has no PIL version) imports torchvision for three kernels: `resize`,
`pad` and `normalize` (and `grayscale_to_rgb`, a no-op on RGB). `torchvision_image_processor` runs
transformers' class unchanged (grid choice, padding, bfloat16 normalization, tiling, global view) with
those three kernels written as torchvision writes them for CPU tensors: uint8 bilinear antialiased resize
through torch's native uint8 kernel (what torchvision picks on AVX2 / AVX-512 CPUs), constant padding right
and bottom, subtract-then-divide in the tensor's dtype.

`conditional_generation_class`: transformers 5.24's `Llama4ForConditionalGeneration.forward` reads
`image_outputs` off its language model's output, which has none; the language model's outputs get the
attribute (None), so the rest of transformers' forward and `generate` run as written.
"""

from __future__ import annotations

import enum
import functools
import sys
import types
from pathlib import Path


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    import torch

    if interpolation != InterpolationMode.BILINEAR or max_size is not None:
        raise NotImplementedError("the test's torchvision stand-in resizes bilinear to a given size only")
    height, width = (int(v) for v in size)
    *lead, c, old_h, old_w = image.shape
    if (height, width) == (old_h, old_w):
        return image
    out = torch.nn.functional.interpolate(image.reshape(-1, c, old_h, old_w), size=[height, width], mode="bilinear",
                                          align_corners=False, antialias=antialias)
    return out.reshape(*lead, c, height, width)


def _pad(image, padding, fill=0, padding_mode="constant"):
    import torch

    fills = set(fill) if isinstance(fill, (list, tuple)) else {fill}
    if padding_mode != "constant" or len(fills) != 1 or len(padding) != 4:
        raise NotImplementedError("the test's torchvision stand-in pads [left, top, right, bottom] with one value")
    left, top, right, bottom = padding
    return torch.nn.functional.pad(image, (left, right, top, bottom), value=float(fills.pop()))


def _normalize(image, mean, std, inplace=False):
    import torch

    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def _grayscale_to_rgb(image):
    if image.shape[-3] != 3:
        raise NotImplementedError("the test's torchvision stand-in takes RGB images only")
    return image


def _import_with_torchvision_kernels() -> type:
    """transformers' `Llama4ImageProcessor`, imported with the kernels above standing in for torchvision's; they
    leave `sys.modules` afterwards, so that no other code finds a torchvision."""
    import transformers.image_processing_backends as backends
    from transformers.image_utils import PILImageResampling

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.resize, functional.pad, functional.normalize = _resize, _pad, _normalize
    functional.grayscale_to_rgb = _grayscale_to_rgb
    functional.InterpolationMode = InterpolationMode
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = functional
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.v2": v2, "torchvision.transforms.v2.functional": functional}
    added = [name for name in stand_ins if name not in sys.modules]
    sys.modules.update({name: stand_ins[name] for name in added})
    try:
        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor
    finally:
        for name in added:
            del sys.modules[name]
    backends.tvF = functional  # what TorchvisionBackend's methods call
    backends.pil_torch_interpolation_mapping = {PILImageResampling.BILINEAR: InterpolationMode.BILINEAR}
    return Llama4ImageProcessor


@functools.cache
def _image_processor_class() -> type:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return _import_with_torchvision_kernels()
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    return Llama4ImageProcessor


def torchvision_image_processor(**settings):
    """transformers' `Llama4ImageProcessor(**settings)`, with the torchvision kernels above when torchvision is
    not installed."""
    return _image_processor_class()(**settings)


def saved_image_processor(folder: Path):
    """The reference processor for a checkpoint folder's `preprocessor_config.json`."""
    import json

    settings = json.loads((folder / "preprocessor_config.json").read_text())
    keep = ("size", "max_patches", "resize_to_max_canvas", "image_mean", "image_std", "rescale_factor", "resample")
    return torchvision_image_processor(**{k: settings[k] for k in keep if k in settings})


def _add_image_outputs(module, args, output):
    output.image_outputs = None
    return output


@functools.cache
def conditional_generation_class() -> type:
    """transformers' `Llama4ForConditionalGeneration` whose language model's outputs carry `image_outputs`
    (same class name, so that what it saves names the real architecture)."""
    import transformers

    class Llama4ForConditionalGeneration(transformers.Llama4ForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.language_model.register_forward_hook(_add_image_outputs)

    return Llama4ForConditionalGeneration
