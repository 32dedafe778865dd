"""The decode engine: KV pages, scheduler, model runner, sampler, detokenizer."""

from serving.engine.engine import EngineConfig, LLMEngine

__all__ = ["EngineConfig", "LLMEngine"]
