"""The token mixer of a layer that keeps a recurrent state instead of a KV cache (`ModelConfig.is_ssm_layer`),
by its `layer_attention` kind."""

from __future__ import annotations

from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import ssm
from model_lib.layers.gated_delta import GatedDeltaNet
from model_lib.layers.rglru import RecurrentBlock


def make_mixer(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """RecurrentGemma's recurrent block ("rglru"), Qwen3-Next's Gated DeltaNet ("gated_delta"), or a
    state-space mixer (Mamba, Mamba-2)."""
    kind = config.layer_attention_kind(layer)
    if kind == "rglru":
        return RecurrentBlock(config, rngs=rngs)
    if kind == "gated_delta":
        return GatedDeltaNet(config, rngs=rngs)
    return ssm.make_mixer(config, layer, rngs=rngs)
