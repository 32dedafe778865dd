"""Session fixtures: each tiny checkpoint is built once and shared by every test."""

from __future__ import annotations

import pytest
from flax import nnx

from tests.model_lib.tiny_models import CASES_BY_NAME, build_checkpoint

_BUILT: dict = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(name)` -> (folder, transformers model), built once per session."""

    def get(name: str):
        if name not in _BUILT:
            folder = tmp_path_factory.mktemp(name)
            _BUILT[name] = (folder, build_checkpoint(CASES_BY_NAME[name], folder))
        return _BUILT[name]

    return get


@nnx.jit
def jit_forward(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


@pytest.fixture(scope="session")
def forward():
    return jit_forward
