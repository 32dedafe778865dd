"""Llama 3.1-3.3 JSON tool calls: the output is `{"name": ..., "parameters": {...}}` objects (optionally after
`<|python_tag|>`, several separated by `;`)."""

from __future__ import annotations

from serving.openai.tool_parsers.base import ToolCall, ToolParser, decode_json_values, json_text

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    markers = (PYTHON_TAG,)

    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith("{"):
            return len(text) - len(stripped)
        return super().start(text)

    def held_back(self, text: str) -> int:
        # An output that is only whitespace so far may still open with `{`.
        return len(text) if not text.strip() else super().held_back(text)

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        body = text[len(PYTHON_TAG):] if text.startswith(PYTHON_TAG) else text
        values = decode_json_values(body)
        calls = [
            ToolCall(v["name"], json_text(v.get("parameters", v.get("arguments", {}))))
            for v in values
            if isinstance(v, dict) and isinstance(v.get("name"), str)
        ]
        return calls
