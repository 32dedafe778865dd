"""What every tool-call parser shares: the call record, whole-text extraction and the streaming driver.

A parser knows where tool calls start in a model's output (`start`) and how to read the calls
out of the text from there (`parse_calls`). Whole outputs: the text before the start is the
content, the rest becomes calls (or stays content if it holds none). Streaming
(`StreamingToolCalls`): content flows out until the start could be under way (a tail that may
begin a marker is held back); from then on the text is buffered and each call is sent once it
is complete, as OpenAI sends calls: a first delta with the call's index, id, type and name and
empty arguments, then the arguments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def message(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Extracted:
    content: str | None
    calls: list[ToolCall]


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def decode_json_values(text: str) -> list[Any]:
    """The complete JSON values at the start of `text`, one after another (separated by whitespace, `,` or `;`)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values
        values.append(value)


class ToolParser:
    """One model family's tool-call format. `tools`: the request's tools (as dicts), which some formats
    need to type their arguments."""

    markers: tuple[str, ...] = ()  # strings that open the tool-call part of an output

    def __init__(self, tools: list[dict[str, Any]] | None = None):
        self.tools = {t["function"]["name"]: t["function"] for t in tools or []}

    def start(self, text: str) -> int | None:
        """Where the tool-call part of `text` begins (None: not in this text)."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` may begin the tool-call part (not sent as content yet)."""
        for size in range(min(len(text), max(map(len, self.markers), default=0)), 0, -1):
            if any(m.startswith(text[-size:]) for m in self.markers):
                return size
        return 0

    def parse_calls(self, text: str, final: bool) -> list[ToolCall]:
        """The calls complete in `text` (which begins at `start`).

        Not `final`: a call still being written is left out (it comes in a later call).
        """
        raise NotImplementedError

    def extract(self, text: str) -> Extracted:
        """A whole output: its content and its calls."""
        begin = self.start(text)
        if begin is None:
            return Extracted(text, [])
        calls = self.parse_calls(text[begin:], final=True)
        if not calls:
            return Extracted(text, [])
        content = text[:begin]
        return Extracted(content if content.strip() else None, calls)


class StreamingToolCalls:
    """Turns one choice's text deltas into content deltas and tool-call deltas."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.begin: int | None = None
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls delta items) after `delta`; `final`: the choice has finished."""
        self.text += delta
        if self.begin is None:
            self.begin = self.parser.start(self.text)
        if self.begin is None:
            upto = len(self.text) if final else len(self.text) - self.parser.held_back(self.text)
            content, self.sent = self.text[self.sent:max(upto, self.sent)], max(upto, self.sent)
            return content, []
        content, self.sent = self.text[self.sent:max(self.begin, self.sent)], max(self.begin, self.sent)
        calls = self.parser.parse_calls(self.text[self.begin:], final)
        items = []
        for index in range(len(self.calls), len(calls)):
            call = calls[index]
            self.calls.append(call)
            items.append({"index": index, "id": call.id, "type": "function",
                          "function": {"name": call.name, "arguments": ""}})
            items.append({"index": index, "function": {"arguments": call.arguments}})
        if final and not self.calls:  # it looked like a call but was none: it was content after all
            content += self.text[self.sent:]
            self.sent = len(self.text)
        return content, items
