"""The token mixer of a recurrent layer (`ModelConfig.is_ssm_layer`), by its `layer_attention` kind."""

from __future__ import annotations

from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import ssm
from model_lib.layers.rglru import RecurrentBlock


def make_mixer(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """RecurrentGemma's recurrent block ("rglru") or a state-space mixer (Mamba, Mamba-2)."""
    if config.layer_attention_kind(layer) == "rglru":
        return RecurrentBlock(config, rngs=rngs)
    return ssm.make_mixer(config, layer, rngs=rngs)
