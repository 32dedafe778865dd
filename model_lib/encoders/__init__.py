"""Pooling models: BERT-style encoders (embeddings, sequence classification, cross-encoders) and Qwen2
reward models, loaded from HF checkpoints; see `loading.py` for the architecture table."""

from model_lib.encoders.config import EncoderConfig
from model_lib.encoders.loading import (
    POOLING_ARCHITECTURES,
    PoolingModel,
    decoder_pooling_model,
    load_pooling_model,
    pooling_architecture,
)
from model_lib.encoders.pooling import POOLING_KINDS, PoolingSpec, pool

__all__ = ["EncoderConfig", "POOLING_ARCHITECTURES", "POOLING_KINDS", "PoolingModel", "PoolingSpec",
           "decoder_pooling_model", "load_pooling_model", "pool", "pooling_architecture"]
