"""Reasoning parsers (`--reasoning-parser`, vLLM's names): split `reasoning_content` from `content`.

Both formats put the reasoning between `<think>` and `</think>`:
- `deepseek_r1`: the output starts in reasoning (DeepSeek-R1's template opens `<think>` in the prompt;
  a `<think>` the model writes itself is skipped); everything up to `</think>` is reasoning, and an
  output that never closes it is all reasoning.
- `qwen3`: the output is reasoning only if it opens with `<think>` (Qwen3 writes it when thinking is
  on); otherwise it is all content.

`split(text, final)` only grows as `text` grows (a tail that may begin a tag waits while not
`final`), so streaming sends the differences (`StreamingReasoning`).
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that begins `tag` (it may be the tag, cut by the stream)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_in_reasoning: bool

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of `text` so far."""
        if not text.startswith(START):
            if not final and START.startswith(text):
                return "", ""  # may still open with the tag
            if not self.starts_in_reasoning:
                return "", text
            body = text
        else:
            body = text[len(START):]
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END):]
        return body[: len(body) - (0 if final else _partial_tag(body, END))], ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """A whole output's (reasoning_content, content), None for an empty part."""
        reasoning, content = self.split(text)
        return reasoning or None, content or None


REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", starts_in_reasoning=True),
    "qwen3": ReasoningParser("qwen3", starts_in_reasoning=False),
}


class StreamingReasoning:
    """One choice's text deltas -> (reasoning delta, content delta)."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.text = ""
        self.sent_reasoning = self.sent_content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self.parser.split(self.text, final)
        out = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return out
