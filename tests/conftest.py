"""Test-wide setup and shared fixtures.

8 simulated CPU devices (set before JAX is imported) for the sharding tests, no
hub access, and the tiny checkpoints of `tests/tiny_models.py`, each built once
per session.
"""

import os
import shutil
import tempfile

# The CPU compiler at its lowest optimisation level: tiny test programs compile in about 60% of the time
# (matmuls are library calls either way, so they run as fast).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Engines compile shapes on first use (no start-up warm-up); tests that check warm-up turn it on themselves.
# One persistent compilation cache per test run, made by the first process (pytest itself, or xdist's
# controller) and shared by the workers and the servers they start: an engine rebuilt with the same model
# and sizes loads its programs instead of compiling them again. Set the variable ("" = off) to choose.
os.environ.setdefault("JAXLLM_ENFORCE_EAGER", "1")
_OWN_CACHE_DIR = None
if "JAXLLM_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = os.environ["JAXLLM_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-test-xla-")
# Steps pad to at least 8 tokens, as on an accelerator: three fewer step shapes to compile per engine than the
# CPU default of 1 (tests/serving/test_engine.py checks that default).
os.environ.setdefault("JAXLLM_MIN_TOKEN_BUCKET", "8")
# Likewise the accelerator's coarser sequence and page-table buckets: the CPU default's tighter ones (every power of
# two) would compile several times as many shapes per engine; tests/serving/test_engine.py runs them.
os.environ.setdefault("JAXLLM_TIGHT_BUCKETS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from serving.engine.executables import release_executables_near_map_limit  # noqa: E402
from serving.engine.warmup import use_compilation_cache  # noqa: E402
from tests.tiny_models import CASES_BY_NAME, build_checkpoint  # noqa: E402

use_compilation_cache(os.environ["JAXLLM_COMPILATION_CACHE_DIR"])  # before anything compiles


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _release_executables_near_the_map_limit():
    """After a test, drop JAX's compiled programs (and their memory mappings) once the process holds half its
    limit: a worker of a full run builds hundreds of engines and reached vm.max_map_count (65530), after which a
    compilation or a cache write fails, and unwinding its C++ exception crashed the worker (SIGABRT) or
    deadlocked it (the run hung at 96%). An engine's own guard (`serving/engine/executables.py`) acts only
    before it compiles a new step shape."""
    yield
    release_executables_near_map_limit(budget=0.5)


@pytest.fixture
def without_compilation_cache():
    """The persistent compilation cache off for one test (a program loaded from it fires no compile event).
    JAX reads the switch once per process, at its first compilation: reset around the test."""
    from jax._src import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()

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
