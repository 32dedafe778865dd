"""What `LLM.generate` and the engine return (vLLM's output classes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append this sequence's next DELTA output. Extends this output's lists in place: it must own
        them, as a DELTA output does (its lists are slices, never the engine's own)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # why the engine failed this request (then finished, finish_reason "error")

    def add(self, delta: RequestOutput) -> None:
        """Append the request's next DELTA output (vLLM's `RequestOutput.add`), in place as `CompletionOutput.add`."""
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:  # every output of a request carries all its sequences
            mine[c.index].add(c)
        self.finished, self.error = delta.finished, delta.error
