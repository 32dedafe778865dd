"""Shared building blocks that every model family composes."""

from model_lib.layers.attention import Attention, DenseBatch, KVCache, PagedBatch
from model_lib.layers.embedding import Embed
from model_lib.layers.linear import Linear
from model_lib.layers.mlp import MLP
from model_lib.layers.norms import LayerNorm, RMSNorm, make_norm

__all__ = ["Attention", "DenseBatch", "KVCache", "PagedBatch", "Embed", "LayerNorm", "Linear", "MLP", "RMSNorm", "make_norm"]
