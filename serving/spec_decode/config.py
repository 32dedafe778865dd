"""`speculative_config` as vLLM spells it: parsed, bounded and checked before anything is built."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "eagle3", "mtp")
MAX_SPECULATIVE_TOKENS = 16  # drafts per sequence and step: the verify step computes k + 1 logits rows each
MAX_PROMPT_LOOKUP = 64  # longest n-gram the prompt-lookup proposer matches
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's value when neither bound is given


@dataclass(frozen=True)
class SpeculativeConfig:
    """`method`: "ngram" (prompt lookup: the continuation of the latest earlier occurrence of the
    sequence's last n tokens, n from `prompt_lookup_max` down to `prompt_lookup_min`) or
    "draft_model" (a smaller checkpoint `model` with the target's vocabulary, run by the same engine),
    "eagle3" (EAGLE-3 heads at `model`, fed the target's hidden states) or "mtp" (the target's own
    MTP layer, DeepSeek-V3 or GLM-4.5; no `model`).
    `num_speculative_tokens`: drafts per sequence and step."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("the ngram method takes no draft 'model'")
            low = self.prompt_lookup_min if self.prompt_lookup_min is not None else self.prompt_lookup_max
            high = self.prompt_lookup_max if self.prompt_lookup_max is not None else self.prompt_lookup_min
            low = DEFAULT_PROMPT_LOOKUP if low is None else low
            high = DEFAULT_PROMPT_LOOKUP if high is None else high
            _check_int("prompt_lookup_max", high, 1, MAX_PROMPT_LOOKUP)
            _check_int("prompt_lookup_min", low, 1, MAX_PROMPT_LOOKUP)
            if low > high:
                raise ValueError(f"prompt_lookup_min ({low}) exceeds prompt_lookup_max ({high})")
            object.__setattr__(self, "prompt_lookup_min", low)
            object.__setattr__(self, "prompt_lookup_max", high)
        else:
            if self.method == "mtp":
                if self.model is not None:
                    raise ValueError("the mtp method runs the target's own MTP layers; it takes no 'model'")
            elif not isinstance(self.model, str) or not self.model:
                raise ValueError(f"the {self.method} method needs 'model': the draft checkpoint's path")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("prompt_lookup_min/max apply to the ngram method only")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict (`LLM(speculative_config=...)`) or its JSON text (`serve --speculative-config`)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}; known: {sorted(known)}")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative config needs {required!r}")
        return cls(**value)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
