"""Structured output: grammar-constrained decoding with xgrammar (JSON schema, regex, choice, EBNF)."""

from serving.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
