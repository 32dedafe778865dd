"""Boolean environment switches of the engine (`JAXLLM_ENFORCE_EAGER`, `JAXLLM_TIGHT_BUCKETS`), read one way."""

from __future__ import annotations

import os

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str) -> bool | None:
    """True/False for a set boolean variable ("1"/"0", "true"/"false", ...), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name}={value!r}: expected 1 or 0")
    return value in _TRUE
