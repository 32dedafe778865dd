"""Hermes (NousResearch; also Qwen2.5 and Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call."""

from __future__ import annotations

import json
import re

from serving.openai.tool_parsers.base import ToolCall, ToolParser, json_text

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


class HermesToolParser(ToolParser):
    markers = ("<tool_call>",)

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        calls = []
        for match in _CALL.finditer(text):
            closed = match.group(0).endswith("</tool_call>")
            if not closed and not final:
                break
            try:
                value = json.loads(match.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                calls.append(ToolCall(value["name"], json_text(value.get("arguments", {}))))
        return calls
