"""A chat choice's text turned into the assistant message: reasoning split off, tool calls parsed out.

Whole (`assistant_message`) or streamed (`ChoiceStream`, one per choice), with the same parsers, so
a streamed choice adds up to the whole one.
"""

from __future__ import annotations

from typing import Any

from serving.openai.protocol import ChatCompletionRequest
from serving.openai.reasoning import ReasoningParser, StreamingReasoning
from serving.openai.tool_parsers import TOOL_PARSERS, StreamingToolCalls, ToolParser
from serving.openai.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser


def finish_reason(reason: str | None, called: bool, forced_name: bool) -> str | None:
    """OpenAI's reason: "tool_calls" when the model chose to call (a named tool_choice keeps "stop")."""
    return "tool_calls" if called and reason == "stop" and not forced_name else reason


def assistant_message(text: str, reasoning: ReasoningParser | None, tools: ToolParser | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    content: str | None = text
    if reasoning is not None:
        message["reasoning_content"], content = reasoning.extract(text)
    if tools is not None and content is not None:
        extracted = tools.extract(content)
        content = extracted.content
        if extracted.calls:
            message["tool_calls"] = [call.message() for call in extracted.calls]
    message["content"] = content
    return message


class ChoiceStream:
    """One streamed choice: each text delta -> the message deltas to send (content, reasoning, calls)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None):
        self.reasoning = StreamingReasoning(reasoning) if reasoning is not None else None
        self.tools = StreamingToolCalls(tools) if tools is not None else None

    @property
    def called(self) -> bool:
        return self.tools is not None and bool(self.tools.calls)

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning is not None else ("", text)
        deltas: list[dict[str, Any]] = []
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
        if content:
            deltas.append({"content": content})
        # OpenAI sends a call's id and name first, then its arguments: one chunk each.
        deltas.extend({"tool_calls": [item]} for item in calls)
        return deltas


class ChatTools:
    """The server's tool-call settings, and the parser each chat request's tool_choice needs."""

    def __init__(self, enable_auto_tool_choice: bool, tool_call_parser: str | None):
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r}; known: {', '.join(TOOL_PARSERS)}")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        self.auto_parser = TOOL_PARSERS[tool_call_parser] if enable_auto_tool_choice else None

    def parser(self, body: ChatCompletionRequest) -> ToolParser | None:
        """None: the text is all content (no tools, or tool_choice "none"); ValueError for "auto" when the
        server does not parse tool calls."""
        if (tool := body.named_tool()) is not None:
            return NamedFunctionParser(tool.function.name)
        choice = body.effective_tool_choice
        if choice == "required":
            return RequiredCallsParser()
        if choice == "auto":
            if self.auto_parser is None:
                raise ValueError('tool_choice "auto" needs the server started with --enable-auto-tool-choice '
                                 "and --tool-call-parser")
            return self.auto_parser(body.template_tools())
        return None
