"""Tool-call parsers (`--tool-call-parser`, vLLM's names): model output text -> OpenAI `tool_calls`."""

from __future__ import annotations

from serving.openai.tool_parsers.base import Extracted, StreamingToolCalls, ToolCall, ToolParser
from serving.openai.tool_parsers.hermes import HermesToolParser
from serving.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from serving.openai.tool_parsers.mistral import MistralToolParser
from serving.openai.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}

__all__ = ["TOOL_PARSERS", "Extracted", "StreamingToolCalls", "ToolCall", "ToolParser"]
