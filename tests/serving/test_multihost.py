"""Multi-host serving: 2 jax.distributed processes x 4 CPU devices serve like one process on 8 devices."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import jax
import pytest

from serving.llm import LLM
from serving.sampling_params import SamplingParams
from tests.processes import finish, free_port, output, start_processes
from tests.serving.helpers import prompts
from tests.serving.multihost_worker import ENGINE, MAX_TOKENS, run_requests
from tests.tiny_models import TinyCase

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)"),
    pytest.mark.slow,
]

# 8 query heads split over the 8 devices, 2 kv heads replicated on them.
HEADS8 = TinyCase("llama-heads8", "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16))


@pytest.fixture(scope="module")
def heads8(tmp_path_factory):
    from tests.tiny_models import build_checkpoint

    folder = tmp_path_factory.mktemp("heads8")
    build_checkpoint(HEADS8, folder)
    return folder


def test_two_processes_generate_the_single_process_tokens(heads8):
    """The leader's tokens equal one process's on the same 8-device mesh (and, greedy, the unsharded
    model's); the follower exits 0 once the leader shuts down (`finish` checks both exit statuses)."""
    procs = start_processes(lambda i, coordinator: [
        "-m", "tests.serving.multihost_worker", str(heads8), coordinator, "2", str(i)])
    try:
        sharded = run_requests(LLM(heads8, **ENGINE))  # the same mesh in one process, meanwhile
    finally:
        leader, _ = finish(procs)
    lines = [line for line in leader.splitlines() if line.startswith("TOKENS ")]
    assert lines, leader[-3000:]
    assert json.loads(lines[0][len("TOKENS "):]) == sharded
    unsharded = run_requests(LLM(heads8, **{**ENGINE, "mesh": None}))
    greedy = [0, 2, 3]  # the seeded draws (request 1) may part where float sums differ in their last bit
    assert [sharded[i] for i in greedy] == [unsharded[i] for i in greedy]


def _wait_healthy(base: str, procs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [output(p)[-2000:] for p in procs]
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail("the leader never served:\n" + output(procs[0])[-3000:])


def test_serve_answers_on_process_0_and_the_follower_exits_with_it(heads8):
    """`serve` over 2 processes: process 0 answers HTTP (greedy tokens of the unsharded model); on its
    SIGINT both processes exit 0."""
    port = free_port()
    flags = ["--served-model-name", "tiny", "--mesh", "tp", "--max-model-len", "64", "--page-size", "16",
             "--num-pages", "32", "--max-num-seqs", "8", "--max-num-batched-tokens", "16", "--log-level", "warning"]
    procs = start_processes(lambda i, coordinator: [
        "-m", "serving.openai.cli", str(heads8), "--port", str(port), *flags,
        "--coordinator-address", coordinator, "--num-processes", "2", "--process-id", str(i)])
    prompt = prompts((5,), seed=3)[0]
    body = dict(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", procs)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            choice = json.loads(response.read())["choices"][0]
        procs[0].send_signal(signal.SIGINT)
    finally:
        finish(procs, timeout=120)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = LLM(heads8, **{**ENGINE, "mesh": None}).generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0]
    assert choice["text"] == expected.text
    assert len(choice["logprobs"]["tokens"]) == MAX_TOKENS
