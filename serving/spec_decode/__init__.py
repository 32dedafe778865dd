"""Speculative decoding: proposers guess tokens, one target step verifies them all (see `step.py`)."""

from serving.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
