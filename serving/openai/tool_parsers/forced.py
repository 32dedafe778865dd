"""The outputs of grammar-enforced tool choices (`serving/openai/structured_fields.py`) read as calls.

A named function's output is its arguments object; "required" writes a JSON list of
`{"name": ..., "parameters": {...}}`. Both start at the first character.
"""

from __future__ import annotations

from serving.openai.tool_parsers.base import ToolCall, ToolParser, decode_json_values, json_text


class NamedFunctionParser(ToolParser):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        values = decode_json_values(text) if final else []
        return [ToolCall(self.name, json_text(values[0]))] if values and isinstance(values[0], dict) else []


class RequiredCallsParser(ToolParser):
    def start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        body = text.lstrip()
        items = decode_json_values(body[1:]) if body.startswith("[") else []  # the list's complete items so far
        return [ToolCall(item["name"], json_text(item.get("parameters", {})))
                for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)]
