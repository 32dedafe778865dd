"""OpenAI response objects (as dicts) built from engine outputs, whole or as stream deltas."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from serving.outputs import CompletionOutput, Logprob

Decode = Callable[[int], str]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error object (what `error_body` builds), for the OpenAPI document."""

    error: ErrorInfo


def error_body(message: str, kind: str, code: int | str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _token_text(token: int, entry: dict[int, Logprob], decode: Decode) -> str:
    lp = entry.get(token)
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else decode(token)


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], decode: Decode, text_offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for these tokens."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = _token_text(token, entry, decode)
        tokens.append(text)
        token_logprobs.append(entry[token].logprob)
        top.append({_token_text(t, entry, decode): lp.logprob for t, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], decode: Decode, top_n: int) -> dict[str, Any]:
    """The chat `logprobs` object: one item per token with its top alternatives."""
    content = []
    for token, entry in zip(token_ids, entries):
        text = _token_text(token, entry, decode)
        alternatives = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_n]
        content.append(
            {
                "token": text,
                "logprob": entry[token].logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": (t_text := _token_text(t, entry, decode)), "logprob": lp.logprob, "bytes": list(t_text.encode())}
                    for t, lp in alternatives
                ],
            }
        )
    return {"content": content}


@dataclass
class StreamCursor:
    """Where one streamed choice stands (the engine hands out DELTA outputs: each chunk is one delta)."""

    text_len: int = 0  # characters of generated text sent so far
    started: bool = False
    done: bool = False

    def advance(self, delta: CompletionOutput) -> int:
        """Count the delta as sent; the offset of its text in the whole generated text."""
        offset, self.text_len = self.text_len, self.text_len + len(delta.text)
        self.done = delta.finish_reason is not None
        return offset


@dataclass
class ResponseHeader:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}
