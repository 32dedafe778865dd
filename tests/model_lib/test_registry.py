"""The registry, the README table and the parity table agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_lib.registry import ARCHITECTURES, UnknownArchitectureError, architecture_table, get_family
from tests.tiny_models import CASES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_the_registry():
    assert architecture_table() in README.read_text(), "regenerate with `python -m model_lib.registry`"


def test_every_architecture_has_parity_cases():
    covered = {case.hf_architecture() for case in CASES}
    assert covered == set(ARCHITECTURES)


def test_unknown_architecture():
    with pytest.raises(UnknownArchitectureError, match=r"supported: .*GPTBigCodeForCausalLM, .*LlamaForCausalLM"):
        get_family("NopeForCausalLM")
