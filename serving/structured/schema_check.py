"""JSON-schema features xgrammar would silently ignore: found up front, so the request gets a 400 naming them.

xgrammar 0.2.9 enforces types, properties/required/additionalProperties, items/prefixItems,
min/maxItems, string length and pattern, numeric ranges and multipleOf, enum/const,
anyOf/oneOf, $ref and the formats below. What it would accept but not enforce (so a
"strict" response could break the schema) is listed in `IGNORED_KEYWORDS`; `allOf` is
refused unless it has a single entry, and so is any other `format`.
"""

from __future__ import annotations

from typing import Any

IGNORED_KEYWORDS = frozenset({
    "uniqueItems", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "unevaluatedItems", "contentEncoding", "contentMediaType", "contentSchema",
    "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
})
SUPPORTED_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "ipv4", "ipv6", "hostname", "uuid", "uri", "uri-reference",
    "json-pointer", "relative-json-pointer",
})
# Keywords whose values are maps from names to subschemas, or lists / single subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames")
MAX_DEPTH = 64


def unsupported_features(schema: Any) -> list[str]:
    """Each feature in `schema` that would not be enforced, with where it sits (`keyword at /json/pointer`)."""
    found: list[str] = []
    _walk(schema, found, "")
    return found


def _walk(node: Any, found: list[str], path: str) -> None:
    if not isinstance(node, dict):
        return
    where = path or "/"
    if path.count("/") > MAX_DEPTH:
        found.append(f"nesting deeper than {MAX_DEPTH} levels at {where}")
        return
    found.extend(f"{key} at {where}" for key in node if key in IGNORED_KEYWORDS)
    if "format" in node and not (isinstance(node["format"], str) and node["format"] in SUPPORTED_FORMATS):
        found.append(f"format {node['format']!r} at {where}")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        found.append(f"allOf with more than one schema at {where}")
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _walk(sub, found, f"{path}/{key}/{_escaped(str(name))}")
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _walk(sub, found, f"{path}/{key}/{i}")
    for key in _SCHEMA_VALUES:
        _walk(node.get(key), found, f"{path}/{key}")


def _escaped(name: str) -> str:
    """A JSON-pointer reference token (RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")
