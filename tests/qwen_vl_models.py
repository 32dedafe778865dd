"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) / GLM-4.1V checkpoints (a 2-block ViT of
4-pixel patches merged 2x2, a 2-layer Qwen2 or GLM-4 or 4-layer Qwen3 decoder with M-RoPE) with a tokenizer,
chat template and PIL image processor, built at test time. A 40x48 image becomes a 32x32 one: 8x8
patches, 16 placeholder tokens. The Qwen3-VL tower resamples a 3x3 learned position table and feeds
DeepStack sets from both blocks to decoder layers 0 and 1 (layers 2 and 3 take none, and a serving
view may scan them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import build_tokenizer

IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID = 128, 129, 130  # added after the tiny tokenizer's 128 pieces
QWEN2_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
QWEN3_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
QWEN_ARCHITECTURES = QWEN2_ARCHITECTURES + QWEN3_ARCHITECTURES
GLM4V = "Glm4vForConditionalGeneration"
ARCHITECTURES = (*QWEN_ARCHITECTURES, GLM4V)
_SLOW = pytest.mark.slow
# The engine path of Qwen2/2.5/3-VL in CI; Qwen3-VL-MoE's (the same path) and GLM-4.1V's in the slow tier.
SERVING_ARCHITECTURES = (*QWEN2_ARCHITECTURES, QWEN3_ARCHITECTURES[0], pytest.param(QWEN3_ARCHITECTURES[1], marks=_SLOW),
                         pytest.param(GLM4V, marks=_SLOW))
# A server per architecture: Qwen2/2.5-VL in CI, the others in the slow tier.
SERVER_ARCHITECTURES = (*QWEN2_ARCHITECTURES, pytest.param(QWEN3_ARCHITECTURES[0], marks=_SLOW),
                        pytest.param(GLM4V, marks=_SLOW))
# The (placeholder, start, end) token texts of each model's image run (ids as above).
IMAGE_TOKENS = {
    **{a: ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>") for a in QWEN_ARCHITECTURES},
    GLM4V: ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>"),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}IMAGE"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def image_marker(architecture: str) -> str:
    """The text a prompt marks one image with (start, one placeholder, end), as the chat template writes it."""
    pad, start, end = IMAGE_TOKENS[architecture]
    return start + pad + end


def qwen_vl_config(architecture: str):
    import transformers

    text = dict(vocab_size=VISION_END_ID + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(depth=2, num_heads=4, patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    tokens = dict(image_token_id=IMAGE_TOKEN_ID, architectures=[architecture])
    if architecture == GLM4V:  # head_dim 32, half of it rotated; a 4x4 position table resampled to each grid
        text.update(num_attention_heads=2, num_key_value_heads=1,
                    rope_parameters={**text["rope_parameters"], "partial_rotary_factor": 0.5})
        vision = dict(common, hidden_size=32, intermediate_size=48, out_hidden_size=64, image_size=16,
                      attention_bias=True)
        return transformers.Glm4vConfig(text_config=text, vision_config=vision, image_start_token_id=VISION_START_ID,
                                        image_end_token_id=VISION_END_ID, **tokens)
    if architecture in QWEN3_ARCHITECTURES:
        text.update(num_hidden_layers=4, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(common, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_position_embeddings=9,
                      deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
        config_class = transformers.Qwen3VLConfig
        if architecture == "Qwen3VLMoeForConditionalGeneration":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                        mlp_only_layers=[1])
            config_class = transformers.Qwen3VLMoeConfig
    elif architecture == "Qwen2VLForConditionalGeneration":
        vision = dict(common, embed_dim=32, mlp_ratio=2, hidden_size=64)
        config_class = transformers.Qwen2VLConfig
    else:  # windows of 2x2 merged units (16 pixels); block 1 attends over the whole image
        vision = dict(common, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[1])
        config_class = transformers.Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=vision, vision_start_token_id=VISION_START_ID,
                        vision_end_token_id=VISION_END_ID, **tokens)


def image_processor(architecture: str = QWEN_ARCHITECTURES[0]):
    """The PIL image processor; both resize a 40x48 image to 32x32 and a 24x56 one to 16x48."""
    if architecture == GLM4V:
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        # GLM's pixel bounds count the two temporal frames.
        return Glm4vImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                      size={"shortest_edge": 8 * 8, "longest_edge": 2 * 32 * 40})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8,
                                    max_pixels=32 * 40)


def build_qwen_vl(folder: Path, architecture: str):
    """Save a tiny model (seed 0, every parameter perturbed) with tokenizer and image processor; return
    the torch model. The image processor alone is saved: the processors need torchvision."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, architecture)(qwen_vl_config(architecture)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS[architecture])})
    tokenizer.chat_template = CHAT_TEMPLATE.replace("IMAGE", image_marker(architecture))
    tokenizer.save_pretrained(folder)
    image_processor(architecture).save_pretrained(folder)
    return model


def processed(images: list[np.ndarray], architecture: str = QWEN_ARCHITECTURES[0]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values `[N, C*Tp*P*P]` of all images, image_grid_thw `[n, 3]`) as transformers makes them."""
    out = image_processor(architecture)(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


def prompt_with_images(text_ids: list[list[int]], grids: np.ndarray) -> list[int]:
    """Text pieces joined by expanded images: piece, start, image_pad x tokens, end, piece, ..."""
    ids = list(text_ids[0])
    for piece, (t, h, w) in zip(text_ids[1:], grids):
        ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * int(t * h * w // 4) + [VISION_END_ID] + list(piece)
    return ids


def hf_greedy(ref, prompt_ids: list[int], images: list[np.ndarray], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt_ids` (placeholders expanded) with `images` in order."""
    import torch

    ids = torch.tensor([prompt_ids])
    extra = {}
    if images:
        pixels, grids = processed(images, ref.config.architectures[0])
        extra = dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
    out = ref.generate(input_ids=ids, mm_token_type_ids=(ids == IMAGE_TOKEN_ID).long(), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, **extra)
    return out[0, ids.shape[1]:].tolist()
