"""Llama 4 (Scout, Maverick): the text model, alone (`Llama4ForCausalLM`) or with its vision tower
(`Llama4ForConditionalGeneration`, the image path in `model_lib/vision/llama4.py`).

What transformers' `modeling_llama4.py` makes each config key mean:
- `no_rope_layers[i]` 1: layer i rotates q/k (interleaved pairs, Meta's complex form);
  0: a NoPE layer. `layer_types` (derived by the config) make the rotary layers
  `chunked_attention` when `attention_chunk_size` is set: a token sees the keys of its
  own chunk of positions, floor(pos / chunk); NoPE layers attend to everything.
- `use_qk_norm`: a weightless RMS norm (eps `rms_norm_eps`) of q and k AFTER rotary, on
  rotary layers only.
- `attn_temperature_tuning`: on NoPE layers, q is scaled by
  1 + attn_scale * log(1 + floor((pos + 1) / floor_scale)).
- `moe_layers` (default every `interleave_moe_layer_step`-th layer): an MoE block of
  `num_local_experts` experts of width `intermediate_size`, a sigmoid top-k router
  (`num_experts_per_tok`, 1 in the released models) whose weight scales the expert INPUT,
  plus an always-on shared expert of the same width; other layers are dense MLPs of
  width `intermediate_size_mlp`.
Experts are stored fused and `[in, out]`: `experts.gate_up_proj [X, E, 2I]` (gate then up)
and `experts.down_proj [X, I, E]`; the MLP sits under `feed_forward` and the router is
`feed_forward.router`.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from model_lib.config import CHUNKED_ATTENTION, FULL_ATTENTION, ModelConfig
from model_lib.families.common import GATE_UP_DOWN, PEFT_EXPERTS, PER_LAYER_TYPE, hf_json, llama_like_fields, moe_fields
from model_lib.registry import Family
from model_lib.weight_map import Fused, WeightMap


def llama4_config(hf: PretrainedConfig, architecture: str) -> ModelConfig:
    text = getattr(hf, "text_config", None)
    multimodal = None
    if text is None:
        text = hf
    else:
        multimodal = llama4_vision_config(hf)
    layers = text.num_hidden_layers
    rope_layers = list(text.no_rope_layers)[:layers]
    if len(rope_layers) != layers:
        raise ValueError(f"no_rope_layers has {len(rope_layers)} entries for {layers} layers")
    unknown = set(text.layer_types) - {FULL_ATTENTION, CHUNKED_ATTENTION}
    if unknown:
        raise ValueError(f"Llama 4 layer_types {sorted(unknown)} are not supported (only full and chunked attention)")
    fields = llama_like_fields(text, architecture, "llama4", attention_bias=True, windows=PER_LAYER_TYPE)
    temperature = bool(text.attn_temperature_tuning)
    return ModelConfig(
        **{
            **fields,
            "intermediate_size": text.intermediate_size_mlp,
            "rope": dataclasses.replace(fields["rope"], interleaved=True),
            "attention_chunk_size": text.attention_chunk_size,
            "nope_layers": () if all(rope_layers) else tuple(not r for r in rope_layers),
            "qk_norm": "l2" if text.use_qk_norm else "none",
            "attn_temperature_floor_scale": int(text.floor_scale) if temperature else None,
            "attn_temperature_scale": float(text.attn_scale) if temperature else 0.0,
            "multimodal": multimodal,
            "hf_config_json": hf_json(hf),  # a conditional checkpoint's whole config, saved back as it came
        },
        **moe_fields(
            text,
            num_experts=text.num_local_experts,
            moe_intermediate_size=text.intermediate_size,
            moe_layers=[i in set(text.moe_layers) for i in range(layers)],
            router_kind="topk_sigmoid",
            moe_scale_input=True,
            norm_topk_prob=False,
            shared_expert_size=text.intermediate_size,
        ),
    )


def llama4_vision_config(hf: PretrainedConfig):
    """The image side of a `Llama4Config` (its `vision_config` and `image_token_index`)."""
    from model_lib.vision.llama4 import Llama4MultiModalConfig, Llama4VisionConfig

    v = hf.vision_config
    sizes = {name: getattr(v, name) for name in ("image_size", "patch_size")}
    if any(not isinstance(value, int) for value in sizes.values()):
        raise ValueError(f"a Llama 4 vision tower with {sizes} is not supported (square sizes only)")
    rope = dict(v.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"a Llama 4 vision tower with rope {rope} is not supported (the default 2D rotary only)")
    shuffle = round(1 / v.pixel_shuffle_ratio)
    if abs(shuffle * v.pixel_shuffle_ratio - 1) > 1e-6:
        raise ValueError(f"pixel_shuffle_ratio {v.pixel_shuffle_ratio} is not 1 / an integer")
    if v.vision_output_dim != v.projector_output_dim:
        raise ValueError(f"vision_output_dim ({v.vision_output_dim}) must equal projector_output_dim "
                         f"({v.projector_output_dim}): the projector takes the adapter's output")
    vision = Llama4VisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, norm_eps=1e-5, activation="gelu", kind="clip",
        rope_theta=float(rope.get("rope_theta", 10000.0)), shuffle=shuffle,
        projector_input_dim=v.projector_input_dim, projector_output_dim=v.projector_output_dim)
    if not 0 <= hf.image_token_id < hf.text_config.vocab_size:
        raise ValueError(f"image_token_index {hf.image_token_id} is outside the vocabulary "
                         f"({hf.text_config.vocab_size})")
    # Every patch feature is taken (the class token is dropped by the tower itself).
    return Llama4MultiModalConfig(vision=vision, image_token_id=hf.image_token_id, feature_layers=(-1,),
                                  feature_strategy="default", projector_activation="none", projector_bias=False)


_FF, _MLP = "model.layers.{i}.feed_forward", "model.layers.{i}.mlp"
LLAMA4_WEIGHTS = WeightMap(
    renames=(
        (f"{_FF}.router", f"{_MLP}.gate"),
        *((f"{_FF}.{p}", f"{_MLP}.{p}") for p in GATE_UP_DOWN),
        *((f"{_FF}.shared_expert.{p}", f"{_MLP}.shared_expert.{p}") for p in GATE_UP_DOWN),
    ),
    tensor_renames=(
        (f"{_FF}.experts.gate_up_proj", f"{_MLP}.experts.gate_up.weight"),
        (f"{_FF}.experts.down_proj", f"{_MLP}.experts.down_proj.weight"),
    ),
    conv1d=(f"{_MLP}.experts.gate_up", f"{_MLP}.experts.down_proj"),
    fused=(
        Fused(f"{_MLP}.experts.gate_up", f"{_MLP}.experts", ("gate_proj", "up_proj"),
              lambda c: (1, (c.moe_intermediate_size, c.moe_intermediate_size)), experts=True),
    ),
    peft_experts=PEFT_EXPERTS,
    peft_experts_hf=f"{_FF}.experts",
    peft_experts_layout="in_out",
)
# The conditional-generation checkpoint nests the same tensors under `language_model.`; the vision modules keep
# transformers' names beside it.
LLAMA4_CONDITIONAL_WEIGHTS = dataclasses.replace(
    LLAMA4_WEIGHTS,
    nested_prefix="language_model.",
    outer_modules=("vision_model", "multi_modal_projector"),
)

_QUIRKS = ("chunked local attention, NoPE layers with temperature tuning, q/k L2 norm after rotary, interleaved MoE "
           "(sigmoid top-k router scaling the expert input, shared expert)")
LLAMA4 = Family("llama4", llama4_config, LLAMA4_WEIGHTS, quirks=_QUIRKS)
LLAMA4_CONDITIONAL = Family("llama4", llama4_config, LLAMA4_CONDITIONAL_WEIGHTS,
                           quirks=f"{_QUIRKS}; image tiles through a ViT with 2D complex rotary, pixel shuffle")
