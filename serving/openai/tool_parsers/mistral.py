"""Mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (v0.3 tokenizers), or
`name[ARGS]{...}` per call (v11+ tokenizers, each call after its own `[TOOL_CALLS]`)."""

from __future__ import annotations


from serving.openai.tool_parsers.base import ToolCall, ToolParser, decode_json_values, json_text

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    markers = (BOT,)

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for part in text.split(BOT)[1:]:
            if ARGS in part:
                name, _, arguments = part.partition(ARGS)
                values = decode_json_values(arguments)
                if values and name.strip():
                    calls.append(ToolCall(name.strip(), json_text(values[0])))
                continue
            values = decode_json_values(part)
            for value in values:
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        calls.append(ToolCall(item["name"], json_text(item.get("arguments", {}))))
        return calls
