"""Tiny random vision-language checkpoints beyond LLaVA, one per architecture, built at test time.

Each `VlmCase` saves a transformers model (seed 0, every parameter perturbed), the tiny tokenizer
with the architecture's image tokens added, and its processor (PIL image processor; Llama 4's settings for
transformers' torchvision-only one), and says how a prompt marks one image. `hf_inputs` runs the
checkpoint's own transformers processor, the reference for placeholder expansion and pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tests.tiny_models import build_tokenizer
from tests.vlm_models import IMAGE_TOKEN, IMAGE_TOKEN_ID, VLM_CHAT_TEMPLATE

TILE = 32  # the towers' input side; tiles of 4x4 patches of 8 pixels
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
VIDEO_TOKEN, VIDEO_TOKEN_ID = "<video>", IMAGE_TOKEN_ID + 1


def _clip(**overrides):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=TILE, patch_size=8, projection_dim=32, **overrides)


def _llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _perturbed(model):
    import torch

    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tokenizer(tokens: list[str], marker: str = IMAGE_TOKEN):
    """The tiny tokenizer with `tokens` added (ids from 128 on); its chat template writes `marker` per image."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE.replace(IMAGE_TOKEN, marker)
    return tokenizer


def _save_processor(folder: Path, processor_class: type, images: Any, tokens: list[str], options: dict) -> None:
    tokenizer = _tokenizer(tokens)
    processor_class(image_processor=images, tokenizer=tokenizer, chat_template=VLM_CHAT_TEMPLATE,
                    **options).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# The processors' own settings (what a hub checkpoint's processor_config.json holds).
NEXT_PROCESSOR = dict(patch_size=8, num_additional_image_tokens=1, vision_feature_select_strategy="default")


def build_llava_next(folder: Path):
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(0)
    config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(IMAGE_TOKEN_ID + 1),
                             image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS)
    model = _perturbed(LlavaNextForConditionalGeneration(config))
    model.save_pretrained(folder)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS)
    _save_processor(folder, LlavaNextProcessor, images, [IMAGE_TOKEN], NEXT_PROCESSOR)
    return model


def build_llava_onevision(folder: Path):
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=8, vision_use_head=False)
    # anyres_max_1: maps larger than one tile's 4x4 rows shrink (bilinear) in every test image.
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_llama(VIDEO_TOKEN_ID + 1),
                                  image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
                                  image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1")
    model = _perturbed(LlavaOnevisionForConditionalGeneration(config))
    model.save_pretrained(folder)
    # LlavaOnevisionProcessor cannot be built without torchvision (its video processor): the image processor
    # and the tokenizer are saved alone, and the placeholders are checked by the model's own count check.
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=PINPOINTS).save_pretrained(folder)
    tokenizer = _tokenizer([IMAGE_TOKEN, VIDEO_TOKEN])
    tokenizer.save_pretrained(folder)
    return model


def build_mistral3(folder: Path):
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    torch.manual_seed(0)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=64, patch_size=8, head_dim=8)
    text = MistralConfig(vocab_size=IMAGE_TOKEN_ID + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                            spatial_merge_size=2)
    model = _perturbed(Mistral3ForConditionalGeneration(config))
    model.save_pretrained(folder)
    # PixtralProcessor needs torchvision: the image processor (resizing to multiples of patch x merge = 16) and
    # the tokenizer are saved alone.
    PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16}).save_pretrained(folder)
    _tokenizer(PIXTRAL_TOKENS, PIXTRAL_TOKENS[0]).save_pretrained(folder)
    return model


PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def build_internvl(folder: Path):
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(0)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TILE, patch_size=8, use_qk_norm=True, use_mean_pooling=False)
    text = Qwen2Config(vocab_size=IMAGE_TOKEN_ID + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                            downsample_ratio=0.5, tie_word_embeddings=False)
    model = _perturbed(InternVLForConditionalGeneration(config))
    model.save_pretrained(folder)
    # InternVLProcessor needs torchvision (its video processor): the image processor (tiles of 32 pixels, up to
    # 4 and a thumbnail) and the tokenizer are saved alone.
    GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                             max_patches=4).save_pretrained(folder)
    _tokenizer(INTERNVL_TOKENS, INTERNVL_TOKENS[0]).save_pretrained(folder)
    return model


INTERNVL_TOKENS = ["<IMG_CONTEXT>", "<img>", "</img>"]


def build_gemma3(folder: Path):
    import json

    import torch
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from model_lib.vision.gemma3 import BOI, EOI, IMAGE

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=8, vision_use_head=False)
    # A window of 3 is shorter than an image's 4 soft tokens: the sliding layers cut into the bidirectional run.
    text = Gemma3TextConfig(vocab_size=IMAGE_TOKEN_ID + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=GEMMA3_TOKENS,
                          image_token_index=IMAGE_TOKEN_ID, boi_token_index=IMAGE_TOKEN_ID + 1,
                          eoi_token_index=IMAGE_TOKEN_ID + 2)
    model = _perturbed(Gemma3ForConditionalGeneration(config))
    model.save_pretrained(folder)
    # Gemma 3's tokenizer names its image tokens (`boi_token`, ...) in tokenizer_config.json; the processor reads them.
    _tokenizer([IMAGE, BOI, EOI], BOI).save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(boi_token=BOI, image_token=IMAGE, eoi_token=EOI)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    images = Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE})
    Gemma3Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(folder),
                    **GEMMA3_PROCESSOR).save_pretrained(folder)
    return model


GEMMA3_TOKENS = 4  # 4x4 patches pooled 2x2
GEMMA3_PROCESSOR = dict(image_seq_length=GEMMA3_TOKENS)


LLAMA4_TOKENS = ["<|image|>", "<|patch|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>"]
# Tiles of 28 pixels in 7-pixel patches: 4x4 patches, pixel-shuffled to 4 feature rows per tile; up to 4 tiles.
LLAMA4_PROCESSOR = dict(patch_size=7, pixel_shuffle_ratio=0.5)


def build_llama4(folder: Path):
    import torch
    from transformers import Llama4Config

    from tests.llama4_reference import conditional_generation_class, torchvision_image_processor
    from tests.tiny_models import LLAMA4_TEXT

    torch.manual_seed(0)
    vocab = IMAGE_TOKEN_ID + len(LLAMA4_TOKENS)
    # Two text layers: a chunked rotary layer with a dense MLP, then a NoPE layer with MoE.
    text = dict(LLAMA4_TEXT, vocab_size=vocab, hidden_size=64, num_attention_heads=4, attention_chunk_size=8,
                num_hidden_layers=2, no_rope_layers=[1, 0], moe_layers=[1])
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=28,
                  patch_size=7, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    ids = {token: IMAGE_TOKEN_ID + i for i, token in enumerate(LLAMA4_TOKENS)}
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=ids["<|patch|>"],
                          boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"])
    model = _perturbed(conditional_generation_class()(config))
    model.save_pretrained(folder)
    # transformers' Llama 4 image processor is torchvision-only: saved as the checkpoint's settings, served by
    # our numpy tiler, and run as the reference through `tests/llama4_reference.py`.
    torchvision_image_processor(size={"height": 28, "width": 28}, max_patches=4).save_pretrained(folder)
    _tokenizer(LLAMA4_TOKENS, LLAMA4_TOKENS[0]).save_pretrained(folder)
    return model


def _llama4_images(folder: Path):
    from tests.llama4_reference import saved_image_processor

    return saved_image_processor(folder)


MLLAMA_IMAGE_TOKEN = "<|image|>"
MLLAMA_GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def build_mllama(folder: Path):
    """A tiny Mllama: tiles of 16 pixels (4x4 patches of 4, 17 tokens), up to 4 tiles, a 2-layer local
    vision transformer (both layers' outputs kept, in reverse order) and a 1-layer global one, a 3-layer
    Llama whose layer 1 cross-attends; the gates drawn away from zero so that every gated branch shows."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  image_size=16, patch_size=4, max_num_tiles=4, intermediate_layers_indices=[1, 0],
                  vision_output_dim=96)
    text = dict(vocab_size=IMAGE_TOKEN_ID, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1], bos_token_id=1,
                eos_token_id=2, pad_token_id=0, max_position_embeddings=256)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID)
    model = _perturbed(MllamaForConditionalGeneration(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in MLLAMA_GATES:
                p.uniform_(-1.5, 1.5)
    model.save_pretrained(folder)
    tokenizer = _tokenizer([MLLAMA_IMAGE_TOKEN], MLLAMA_IMAGE_TOKEN)
    MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4),
                    tokenizer=tokenizer, chat_template=tokenizer.chat_template).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@dataclass(frozen=True)
class VlmCase:
    build: Callable[[Path], Any]
    processor: str | None  # the transformers processor class (None: there is none without torchvision)
    processor_options: dict
    image_marker: str = IMAGE_TOKEN  # what a prompt writes for one image (the processor expands it)
    counts_images: bool = False  # the model takes `batch_num_images` (OneVision)
    video: bool = False  # the model takes videos (`VIDEO_TOKEN`)
    # The reference image processor, where serving's is not transformers' (None: `load_image_processor`'s).
    reference_images: Callable[[Path], Any] | None = None
    # Images read by cross attention (Mllama): its dense forward takes the processor's inputs, and its logits
    # are checked in tests/model_lib/test_mllama.py.
    cross_attention: bool = False


VLM_CASES = {
    "llava_next": VlmCase(build_llava_next, "LlavaNextProcessor", NEXT_PROCESSOR),
    "llava_onevision": VlmCase(build_llava_onevision, None, {}, counts_images=True, video=True),
    "mistral3": VlmCase(build_mistral3, None, {}, image_marker=PIXTRAL_TOKENS[0]),
    "internvl": VlmCase(build_internvl, None, {}, image_marker=INTERNVL_TOKENS[0]),
    "gemma3": VlmCase(build_gemma3, "Gemma3Processor", GEMMA3_PROCESSOR, image_marker="<start_of_image>"),
    "llama4": VlmCase(build_llama4, "Llama4Processor", LLAMA4_PROCESSOR, image_marker=LLAMA4_TOKENS[0],
                      reference_images=_llama4_images),
    "mllama": VlmCase(build_mllama, "MllamaProcessor", {}, image_marker=MLLAMA_IMAGE_TOKEN, cross_attention=True),
}


def hf_inputs(case: VlmCase, folder: Path, text: str, images: list) -> dict:
    """Model inputs for (text, images) as torch tensors: the checkpoint's transformers processor, built from its
    parts (`AutoProcessor` wants torchvision for the video processors); without one, the image processor's
    pixels and our placeholder expansion."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    import model_lib
    from serving.multimodal.images import load_image_processor
    from serving.multimodal.inputs import ImageInputs

    tokenizer = AutoTokenizer.from_pretrained(folder)
    images_processor = (case.reference_images or load_image_processor)(folder)
    if case.processor is not None:
        processor = getattr(transformers, case.processor)(image_processor=images_processor, tokenizer=tokenizer,
                                                          **case.processor_options)
        inputs = dict(processor(text=text, images=images or None, return_tensors="pt"))
        if "pixel_values" in inputs:  # Llama 4's processor gives bfloat16 pixels (exact in float32)
            inputs["pixel_values"] = inputs["pixel_values"].float()
        return inputs
    mm = model_lib.load_config(folder)[0].multimodal.with_tokenizer(tokenizer)
    ids, _ = ImageInputs(mm, images_processor, len(images))(tokenizer.encode(text, add_special_tokens=False), images)
    inputs = {**images_processor(images=images, return_tensors="pt"), "input_ids": torch.tensor([ids])}
    inputs.pop("num_patches", None)  # InternVL's processor keeps it
    if case.counts_images:
        inputs["batch_num_images"] = torch.tensor([len(images)])
    return inputs


def our_images(folder: Path, images: list) -> tuple[list, list]:
    """(pixels, original sizes) of each image as serving preprocesses it, for the dense forward."""
    import model_lib
    from serving.multimodal.images import load_image_processor, preprocess

    mm = model_lib.load_config(folder)[0].multimodal
    processed = [preprocess(load_image_processor(folder), image) for image in images]
    return [mm.pixels_for(p, len(images)) for p, _ in processed], [size for _, size in processed]
