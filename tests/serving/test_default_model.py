"""The bundled toy model (models/jaxllm-tiny-chat): served by `serve models/jaxllm-tiny-chat`, it converts km to m."""

from __future__ import annotations

import random
import signal
import sys

import openai
import pytest

from serving.default_model import BUNDLED_MODEL
from tests.serving.helpers import start_server

sys.path.insert(0, str(BUNDLED_MODEL.parents[1] / "scripts"))
from build_default_model import NUMBERS, answer, is_held_out, question  # noqa: E402

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("default_model")


def test_bundled_model_files():
    names = {p.name for p in BUNDLED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in BUNDLED_MODEL.iterdir()) <= 20 * 2**20


@pytest.fixture(scope="module")
def default_server():
    base, proc, _ = start_server([str(BUNDLED_MODEL), "--log-level", "warning", "--max-model-len", "64"])
    yield base + "/v1"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_default_model_answers_held_out_questions_over_http(default_server):
    client = openai.OpenAI(base_url=default_server, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["jaxllm-tiny-chat"]
    rng = random.Random(7)
    numbers = [n for n in NUMBERS if is_held_out(n)]  # never seen in training

    import asyncio

    aclient = openai.AsyncOpenAI(base_url=default_server, api_key="unused", max_retries=0)

    async def ask(n: int) -> bool:
        reply = await aclient.chat.completions.create(
            model="jaxllm-tiny-chat", messages=[{"role": "user", "content": question(n, rng)}], temperature=0, max_tokens=10
        )
        return reply.choices[0].message.content.strip() == answer(n)

    async def run():
        return await asyncio.gather(*[ask(n) for n in numbers])

    correct = asyncio.run(run())
    assert len(correct) == 100
    assert sum(correct) / len(correct) >= 0.9, f"{sum(correct)} / {len(correct)} held-out conversions right"
