"""LLaVA (`LlavaForConditionalGeneration`): a CLIP vision tower, a projector, and a registry decoder.

The language model is any identity-loaded family of the registry (`text_config.model_type`:
llama, mistral, qwen2, ...), mapped by that family; the vision tower is transformers'
`CLIPVisionModel`. Checkpoints name the parts by the transformers version that saved them:
hub ones `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`; transformers 5 in memory `model.language_model.*`,
`model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head`. All load; saving writes
the transformers 5 names.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PretrainedConfig

from model_lib.config import ModelConfig
from model_lib.families.common import hf_json
from model_lib.registry import Family, get_family
from model_lib.vision.anyres import AnyResConfig
from model_lib.vision.config import MultiModalConfig, VisionConfig
from model_lib.weight_map import IDENTITY, WeightMap


def _text_family(text: PretrainedConfig) -> tuple[str, Family]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type)
    family = None
    if architecture is not None:
        try:
            family = get_family(architecture)
        except ValueError:
            family = None
    if family is None or family.weight_map != IDENTITY or family.remote_code:
        raise ValueError(f"LLaVA with a {text.model_type!r} language model is not supported "
                         "(the text model must be an identity-loaded family: llama, mistral, qwen2, ...)")
    return architecture, family


VISION_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "pixtral": "pixtral"}


def clip_vision_config(vision: PretrainedConfig) -> VisionConfig:
    """A CLIP, SigLIP or Pixtral tower's settings."""
    if vision.model_type not in VISION_TOWERS:
        raise ValueError(f"a {vision.model_type!r} vision tower is not supported (only {sorted(VISION_TOWERS)})")
    kind = VISION_TOWERS[vision.model_type]
    if kind == "pixtral":
        rope = dict(vision.rope_parameters or {})
        if rope.get("rope_type", "axial") != "axial" or vision.head_dim != vision.hidden_size // vision.num_attention_heads:
            raise ValueError(f"a Pixtral tower with rope {rope} and head_dim {vision.head_dim} is not supported "
                             "(axial RoPE over hidden_size / num_attention_heads only)")
        return VisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                            num_layers=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
                            image_size=vision.image_size, patch_size=vision.patch_size,
                            num_channels=vision.num_channels, activation=vision.hidden_act, kind=kind,
                            rope_theta=float(rope.get("rope_theta", 10000.0)))
    return VisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_layers=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        norm_eps=vision.layer_norm_eps,
        activation=vision.hidden_act,
        kind=kind,
    )


def llava_config(hf: PretrainedConfig, architecture: str, mm_class: type[MultiModalConfig] = MultiModalConfig,
                 vision: VisionConfig | None = None, **mm_fields: Any) -> ModelConfig:
    """LLaVA's settings; the other LLaVA-style models pass their own `mm_class` and its extra fields, and
    their tower's settings (`vision`) where it is not CLIP, SigLIP or Pixtral."""
    text_architecture, family = _text_family(hf.text_config)
    layers = hf.vision_feature_layer
    multimodal = mm_class(
        vision=clip_vision_config(hf.vision_config) if vision is None else vision,
        image_token_id=hf.image_token_id,
        feature_layers=(layers,) if isinstance(layers, int) else tuple(layers),
        # Mistral 3 has no such key: its features keep every token.
        feature_strategy=getattr(hf, "vision_feature_select_strategy", "full"),
        projector_activation=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        **mm_fields,
    )
    return _with_text(hf, architecture, family.config_from_hf(hf.text_config, text_architecture), multimodal)


def _with_text(hf: PretrainedConfig, architecture: str, text: ModelConfig, multimodal: MultiModalConfig) -> ModelConfig:
    """The text model's config carrying the vision side."""
    if not 0 <= multimodal.image_token_id < hf.text_config.vocab_size:
        raise ValueError(f"image_token_id {multimodal.image_token_id} is outside the vocabulary "
                         f"({hf.text_config.vocab_size})")
    # transformers ties the output head by the top-level key of a vision-language config.
    tied = bool(getattr(hf, "tie_word_embeddings", text.tie_word_embeddings))
    return text.replace(architecture=architecture, family=f"llava/{text.family}", multimodal=multimodal,
                        tie_word_embeddings=tied, hf_config_json=hf_json(hf))


LLAVA_WEIGHTS = WeightMap(
    key_renames=(
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^model\.language_model\.", "model."),
        (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^(model\.)?image_newline$", "image_newline.weight"),
    ),
    relocated=(
        ("model.language_model", "model"),
        ("model.vision_tower", "vision_tower"),
        ("model.multi_modal_projector", "multi_modal_projector"),
    ),
    # LLaVA-NeXT's bare `image_newline` is held as a module's weight (`model_lib/vision/vlm.py` LearnedRow).
    tensor_renames=(("model.image_newline", "image_newline.weight"),),
    ignored=(*IDENTITY.ignored, r".*position_ids", r"^vision_tower\.head\."),  # SigLIP's unused pooling head
)

LLAVA = Family("llava", llava_config, LLAVA_WEIGHTS,
               quirks="CLIP vision tower + projector; image features merged at placeholder tokens")



def llava_next_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    return llava_config(hf, architecture, AnyResConfig, grid_pinpoints=pinpoints(hf.image_grid_pinpoints))


def pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}")
    return tuple((int(h), int(w)) for h, w in value)


LLAVA_NEXT = Family("llava_next", llava_next_config, LLAVA_WEIGHTS,
                    quirks="LLaVA with any-resolution tiles, unpadding and image_newline")


def llava_onevision_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    aspect = hf.vision_aspect_ratio
    match = re.fullmatch(r"anyres_max_(\d+)", aspect or "")
    if match is None:
        raise ValueError(f"vision_aspect_ratio {aspect!r} is not supported (only anyres_max_<N>)")
    return llava_config(hf, architecture, AnyResConfig, grid_pinpoints=pinpoints(hf.image_grid_pinpoints),
                        anyres_max=int(match.group(1)), video_token_id=hf.video_token_id)


LLAVA_ONEVISION = Family("llava_onevision", llava_onevision_config, LLAVA_WEIGHTS,
                         quirks="LLaVA-NeXT tiling with a SigLIP tower and anyres_max shrinking; videos (pooled frames)")


def mistral3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    from model_lib.vision.mistral3 import Mistral3Config

    # The [IMG_BREAK] / [IMG_END] ids are the tokenizer's (`MultiModalConfig.with_tokenizer`).
    return llava_config(hf, architecture, Mistral3Config, spatial_merge_size=hf.spatial_merge_size,
                        projector_norm_eps=hf.text_config.rms_norm_eps)


MISTRAL3 = Family("mistral3", mistral3_config, LLAVA_WEIGHTS,
                  quirks="Pixtral tower (axial 2D RoPE), patch merger; `[IMG_BREAK]`/`[IMG_END]` in the image's run")


def internvl_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    from model_lib.vision.internvit import InternVisionConfig
    from model_lib.vision.internvl import InternVLConfig

    v = hf.vision_config
    sizes = {name: tuple(getattr(v, name)) if isinstance(getattr(v, name), (list, tuple)) else (getattr(v, name),) * 2
             for name in ("image_size", "patch_size")}
    if any(a != b for a, b in sizes.values()) or not v.use_absolute_position_embeddings or v.use_mask_token:
        raise ValueError(f"an InternViT with image_size {list(sizes['image_size'])}, patch_size "
                         f"{list(sizes['patch_size'])}, use_absolute_position_embeddings "
                         f"{v.use_absolute_position_embeddings}, use_mask_token {v.use_mask_token} is not supported "
                         "(square sizes and absolute positions only)")
    vision = InternVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, image_size=sizes["image_size"][0], patch_size=sizes["patch_size"][0],
        num_channels=v.num_channels, norm_eps=v.layer_norm_eps, activation=v.hidden_act, kind="clip",
        norm_type=v.norm_type, qk_norm=bool(v.use_qk_norm), attention_bias=bool(v.attention_bias),
        final_norm=not v.use_mean_pooling)
    shuffle = round(1 / hf.downsample_ratio)
    if abs(shuffle * hf.downsample_ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio {hf.downsample_ratio} is not 1 / an integer")
    layers = hf.vision_feature_layer
    if not isinstance(layers, int):
        raise ValueError(f"InternVL takes one vision_feature_layer, got {layers}")
    # The ids of <img> / </img> are the tokenizer's (`MultiModalConfig.with_tokenizer`).
    return llava_config(hf, architecture, InternVLConfig, vision=vision, shuffle=shuffle)


INTERNVL = Family("internvl", internvl_config, LLAVA_WEIGHTS,
                  quirks="InternViT tiles (layer scale), pixel shuffle, `<img>`/`<IMG_CONTEXT>`/`</img>` runs")


def gemma3_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    from model_lib.vision.gemma3 import Gemma3VisionConfig

    text_architecture, family = _text_family(hf.text_config)
    vision = clip_vision_config(hf.vision_config)
    if vision.kind != "siglip":
        raise ValueError(f"Gemma 3 with a {hf.vision_config.model_type!r} tower is not supported (SigLIP only)")
    multimodal = Gemma3VisionConfig(vision=vision, image_token_id=hf.image_token_id, feature_layers=(-1,),
                                    feature_strategy="full", mm_tokens_per_image=hf.mm_tokens_per_image,
                                    projector_norm_eps=hf.vision_config.layer_norm_eps)
    # Image runs are bidirectional spans: every serving step carries `visible_until`.
    text = family.config_from_hf(hf.text_config, text_architecture).replace(bidirectional_spans=True)
    return _with_text(hf, architecture, text, multimodal)


GEMMA3_VL = Family("gemma3_vl", gemma3_config, LLAVA_WEIGHTS,
                   quirks="Gemma 3 with a SigLIP tower, pooled soft tokens; each image's tokens attend bidirectionally")
