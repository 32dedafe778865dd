"""Qwen3-Coder: XML-like calls, each parameter's value as raw text typed by the tool's schema.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>
"""

from __future__ import annotations

import json
import re
from typing import Any

from serving.openai.tool_parsers.base import ToolCall, ToolParser, json_text

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """`value` converted to the JSON type the parameter's schema names (left a string if it does not parse)."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if value == "null" and "null" in kinds:
        return None
    try:
        if "integer" in kinds:
            return int(value)
        if "number" in kinds:
            number = float(value)
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        if "boolean" in kinds:
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
        if "object" in kinds or "array" in kinds:
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        pass
    return value


class Qwen3CoderToolParser(ToolParser):
    markers = ("<tool_call>", "<function=")

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        calls = []
        for match in _FUNCTION.finditer(text):
            name = match.group(1).strip()
            properties = (self.tools.get(name, {}).get("parameters") or {}).get("properties", {})
            arguments = {
                key.strip(): _typed(value, properties.get(key.strip(), {}))
                for key, value in _PARAMETER.findall(match.group(2))
            }
            calls.append(ToolCall(name, json_text(arguments)))
        return calls
