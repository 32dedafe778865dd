"""`StructuredOutputsParams`: what a request's output must match (vLLM's field names).

Exactly one constraint is set: `json` (a JSON schema, as a dict or a string), `json_object`
(any JSON object), `regex`, `choice` (one of a list of strings) or `grammar` (EBNF, GBNF
syntax). Sizes are bounded so a request cannot make the grammar compiler run away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar above this is refused
MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    # JSON: allow any whitespace between tokens (True) or xgrammar's compact separators (False).
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_kinds) or 'none'}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or len(self.choice) > MAX_CHOICES \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be 1 to {MAX_CHOICES} non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is longer than {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as one string (the grammar cache's key, with `kind`)."""
        if self.json is not None:
            # Key order kept: a schema's property order is the order the grammar writes them in.
            return self.json if isinstance(self.json, str) else json.dumps(self.json)
        if self.choice is not None:
            return json.dumps(list(self.choice))
        return self.regex or self.grammar or ""

    @property
    def key(self) -> tuple[str, str, bool]:
        return self.kind, self.spec, self.whitespace_flexible
