"""The token mixer of a layer that keeps a recurrent state instead of a KV cache, by its kind."""

from __future__ import annotations

from flax import nnx

from model_lib.config import ModelConfig
from model_lib.layers import ssm
from model_lib.layers.gated_delta import GatedDeltaNet


def make_mixer(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Mamba's or Mamba-2's state-space mixer, or Qwen3-Next's Gated DeltaNet."""
    if config.layer_attention_kind(layer) == "gated_delta":
        return GatedDeltaNet(config, rngs=rngs)
    return ssm.make_mixer(config, layer, rngs=rngs)
