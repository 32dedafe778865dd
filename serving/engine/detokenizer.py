"""Incremental detokenisation and stop strings.

Decoding each new token alone breaks words that span tokens (SentencePiece
spaces, multi-byte characters split over byte tokens). As in vLLM, we decode a
short window ending at the new token, compare with the same window without it,
and emit the difference once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens kept as context for the first generated tokens


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    skip_special_tokens: bool
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    @classmethod
    def for_prompt(cls, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool) -> "IncrementalDetokenizer":
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        return cls(tokenizer, skip_special_tokens, context, 0, len(context))

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]


def find_stop(text: str, new_from: int, stops: list[str], include: bool) -> tuple[int, str] | None:
    """If a stop string ends inside the new text (from `new_from` on), where to cut and which one."""
    longest = max(map(len, stops))
    search_from = max(0, new_from - longest + 1)
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, search_from)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    return (at + len(stop) if include else at), stop
