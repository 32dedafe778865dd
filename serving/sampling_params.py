"""`SamplingParams`: how one request is decoded (vLLM's names and defaults).

Every numeric field has a bound (`BOUNDS`, one table shared with the server's
request schema). Limits that depend on the engine (n, logprobs, stop strings,
max_tokens against max_model_len) are checked by `LLMEngine.validate_request`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from serving.structured.params import StructuredOutputsParams

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE = 1e-2  # smaller positive temperatures are raised to this (as vLLM), to keep logits finite


class RequestOutputKind(enum.Enum):
    """What each engine output of a request holds (vLLM's names)."""

    CUMULATIVE = 0  # everything so far, after every step (the default)
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # one output, when the request finishes


class Bound(NamedTuple):
    """Closed range [low, high]; `low_open` makes the lower end exclusive."""

    low: float
    high: float
    low_open: bool = False

    def holds(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


INTEGER_FIELDS = ("n", "top_k", "seed", "max_tokens", "logprobs")
BOUNDS: dict[str, Bound] = {
    "n": Bound(1, INT32_MAX),
    "temperature": Bound(0, 100),
    "top_p": Bound(0, 1, low_open=True),
    "top_k": Bound(-1, INT32_MAX),  # -1 or 0: off; beyond the vocabulary: off
    "min_p": Bound(0, 1),
    "repetition_penalty": Bound(0.01, 100),  # vLLM's > 0, kept clear of float32 underflow
    "presence_penalty": Bound(-2, 2),
    "frequency_penalty": Bound(-2, 2),
    "seed": Bound(INT64_MIN, INT64_MAX),  # what OpenAI and vLLM take: a signed 64-bit integer
    "max_tokens": Bound(1, INT32_MAX),
    "logprobs": Bound(0, INT32_MAX),  # the engine caps it (max_logprobs)
}
TOKEN_ID_BOUND = Bound(0, INT32_MAX)


@dataclass
class SamplingParams:
    """Per-request decoding settings; validated on construction (ValueError naming the field).

    temperature 0 means greedy. top_k 0 or -1, top_p 1 and min_p 0 disable
    those filters. `seed` makes sampling reproducible whatever else is batched
    with the request. `logprobs=N` returns the sampled token's log-probability
    and the N most likely (from the model's raw distribution).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Grammar-constrained output (JSON schema, regex, choice, EBNF): serving/structured/.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in ("seed", "max_tokens", "logprobs"):
                continue
            if name in INTEGER_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer in {bound.describe()}, got {value!r}")
            if not bound.holds(value):
                raise ValueError(f"{name} must be in {bound.describe()}, got {value!r}")
        if self.top_k == -1:
            self.top_k = 0
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))) or not all(isinstance(s, str) for s in self.stop or []):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and TOKEN_ID_BOUND.holds(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers in {TOKEN_ID_BOUND.describe()}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
