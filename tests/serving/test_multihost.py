"""Multi-host serving: 2 jax.distributed processes x 4 CPU devices serve like one process on 8 devices."""

from __future__ import annotations

import json

import jax
import pytest

from tests.processes import finish, start_processes
from tests.serving.multihost_worker import ENGINE, run_requests
from tests.tiny_models import TinyCase

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)

# 8 query heads split over the 8 devices, 2 kv heads replicated on them.
HEADS8 = TinyCase("llama-heads8", "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2))


@pytest.fixture(scope="module")
def heads8(tmp_path_factory):
    from tests.tiny_models import build_checkpoint

    folder = tmp_path_factory.mktemp("heads8")
    build_checkpoint(HEADS8, folder)
    return folder


def test_two_processes_generate_the_single_process_tokens(heads8):
    from serving.llm import LLM

    procs = start_processes(lambda i, coordinator: [
        "-m", "tests.serving.multihost_worker", str(heads8), coordinator, "2", str(i)])
    try:
        sharded = run_requests(LLM(heads8, **ENGINE))  # the same mesh in one process, meanwhile
    finally:
        leader, follower = finish(procs)
    lines = [line for line in leader.splitlines() if line.startswith("TOKENS ")]
    assert lines, leader[-3000:]
    assert json.loads(lines[0][len("TOKENS "):]) == sharded
    unsharded = run_requests(LLM(heads8, **{**ENGINE, "mesh": None}))
    greedy = [0, 1, 2, 3, 5]  # the seeded draws may part where float sums differ in their last bit
    assert [sharded[i] for i in greedy] == [unsharded[i] for i in greedy]
    assert "the leader stopped after" in follower
