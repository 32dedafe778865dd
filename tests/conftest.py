"""Test-wide setup and shared fixtures.

8 simulated CPU devices (set before JAX is imported) for the sharding tests, no
hub access, and the tiny checkpoints of `tests/tiny_models.py`, each built once
per session.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engines compile shapes on first use (no start-up warm-up) and keep no on-disk compilation cache;
# tests that check warm-up turn it on themselves. Servers started by tests inherit both.
os.environ.setdefault("JAXLLM_ENFORCE_EAGER", "1")
os.environ.setdefault("JAXLLM_COMPILATION_CACHE_DIR", "")

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from tests.tiny_models import CASES_BY_NAME, build_checkpoint  # noqa: E402

_BUILT: dict = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(name)` -> (folder, transformers model); the folder also holds a tiny tokenizer."""

    def get(name: str):
        if name not in _BUILT:
            folder = tmp_path_factory.mktemp(name)
            _BUILT[name] = (folder, build_checkpoint(CASES_BY_NAME[name], folder))
        return _BUILT[name]

    return get


@nnx.jit
def _jit_forward(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


@pytest.fixture(scope="session")
def forward():
    """A compiled dense forward: `forward(model, ids, mask)` -> logits."""
    return _jit_forward
