"""A tiny random LLaVA checkpoint (CLIP tower of 2 layers, 32x32 images in 8x8 patches: 16 image
tokens; a 2-layer Llama) with a tokenizer, chat template and image processor, built at test time."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from flax import nnx

from tests.tiny_models import build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128  # added after the 128 pieces of the tiny tokenizer
IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches, CLS dropped
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def llava_config(**overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=IMAGE_TOKEN_ID + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, **overrides)


def build_llava(folder: Path, **overrides):
    """Save a tiny LLaVA (seed 0, every parameter perturbed) with tokenizer and processor; return the torch model."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(**overrides)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        chat_template=VLM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@partial(nnx.jit, static_argnames=("image_sizes",))
def _vision_forward(model, input_ids, images, image_sizes):
    return model(input_ids, **images, **({} if image_sizes is None else {"image_sizes": image_sizes}))


def vision_forward(model, input_ids, image_sizes=None, **images) -> np.ndarray:
    """`model(input_ids, **images)` compiled as one program (run op by op, a tiny vision-language model
    compiles each operation apart: most of a minute): pixels traced, image sizes static."""
    sizes = None if image_sizes is None else tuple(tuple(int(v) for v in size) for size in image_sizes)
    return np.asarray(_vision_forward(model, np.asarray(input_ids), images, sizes))


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A random RGB image `[H, W, 3]` uint8 (not square: the processor resizes and crops)."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
