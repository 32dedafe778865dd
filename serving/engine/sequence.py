"""A sequence's life in the engine: tokens, KV pages, progress and finish state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from serving.engine.kv_pages import PageKey
from serving.multimodal.inputs import ImageItem
from serving.outputs import Logprob
from serving.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One of the `n` completions of a request."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # generated tokens allowed (params.max_tokens capped by max_model_len)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    page_keys: list[PageKey] = field(default_factory=list)  # keys of the full pages, in order
    num_computed: int = 0  # tokens whose KV sits in the pages
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    slot: int | None = None  # its row of the device-side sampling state while running
    num_pending: int = 0  # tokens sampled by dispatched steps that the host has not read yet
    emitted: int = 0  # output tokens already handed out in delta outputs
    emitted_text: int = 0  # characters of text already handed out in delta outputs
    lora_slot: int = -1  # its LoRA adapter's slot in the served stacks (-1: the base model)
    cache_salt: int = 0  # salts its prefix-cache page keys (its adapter's load; 0: the base model)
    # The prompt's images (shared by the request's sequences; serving/multimodal/inputs.py).
    images: list[ImageItem] = field(default_factory=list)
    mrope: Any = None  # M-RoPE models: its prompt's `MRopePositions`, computed at its first step
    encoder_ids: list[int] | None = None  # an encoder-decoder's source (the prompt); the decoder's is prompt_ids
    encoder_features: Any = None  # or its audio source: log-mel features [num_mel_bins, frames] (Whisper)
    encoder_len: int = 0  # encoder positions of its source (what the step's encoder budget counts)
    token_masks: Any = None  # `TokenMasks` its sampled tokens keep to (serving/structured/token_masks.py)
    matcher: Any = None  # structured output: its xgrammar matcher, advanced by every token read
    spec_tokens: list[int] = field(default_factory=list)  # drafts to verify after the known tokens (speculation)
    # Bidirectional spans of the prompt: sorted, disjoint `(start, end)` ranges (serving/engine/spans.py).
    spans: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> list[int]:
        """The known tokens (prompt and read outputs)."""
        return self.prompt_ids + self.output_ids

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens including those still on the device: what the next step builds on."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def at_token_limit(self) -> bool:
        """Its pending tokens bring it to max_tokens: it finishes ("length") once they are read."""
        return len(self.output_ids) + self.num_pending >= self.max_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """`tokens[start:end]` without building the whole token list."""
        split = len(self.prompt_ids)
        if start >= split:
            return self.output_ids[start - split : end - split]
        if end <= split:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - split]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
