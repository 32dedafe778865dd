"""Text that a tokenizer (and a UTF-8 response) can take: no lone UTF-16 surrogates.

JSON may spell a lone surrogate (`"\\ud800"`); Python decodes it into a str
that cannot be encoded as UTF-8, so the tokenizer and every response that
echoes it would fail. Such text is refused up front, naming where it was.
"""

from __future__ import annotations

from typing import Any


def has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(text: str, where: str) -> None:
    """ValueError if `text` holds a lone surrogate."""
    if has_lone_surrogate(text):
        raise ValueError(f"{where} holds a lone UTF-16 surrogate (not valid Unicode text)")


def find_lone_surrogate(value: Any, where: str = "the body") -> str | None:
    """Where in a JSON value (keys included) a string with a lone surrogate sits, or None.

    Iterative, so any nesting that the JSON parser accepted is walked without recursion.
    """
    stack = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and has_lone_surrogate(key):
                    return f"{path} (a key)"
                stack.append((key if path == where else f"{path}.{key}", child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None
