"""The real `serve` process on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.serving.helpers import start_server

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("openai_server")

API_KEY = "sk-test-key"
MODEL = "tiny"
PROMPTS = [f"Prompt number {i}: the quick brown fox" for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    base, proc, lines = start_server(
        [str(folder), "--served-model-name", MODEL, "--api-key", API_KEY, "--max-model-len", "96", "--page-size", "8",
         "--max-num-seqs", "64", "--max-num-batched-tokens", "256", "--log-level", "warning"]
    )
    yield dict(base=base, proc=proc, lines=lines)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)


def raw(server, path: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, dict | str]:
    request = urllib.request.Request(server["base"] + path, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(server, name: str, label: str = "") -> float:
    """Sum of a metric's samples over all label sets (that contain `label`, if given)."""
    _, text = raw(server, "/metrics", key=None)
    found = re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
    return sum(float(value) for labels, value in found if label in labels)


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_streamed_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streamed_equals_whole(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_parameters_reach_the_engine(client):
    seeded = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    first = client.completions.create(**seeded).choices[0].text
    assert client.completions.create(**seeded).choices[0].text == first
    two = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=1.0, n=2, seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    stop = greedy[5:7]
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[: greedy.find(stop)] and stopped.choices[0].finish_reason == "stop"
    logged = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0, logprobs=2)
    lp = logged.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(top) >= 2 for top in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(len(item.top_logprobs) == 2 for item in chat.choices[0].logprobs.content)
    token_prompt = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4, temperature=0)
    assert token_prompt.usage.prompt_tokens == 4


def test_64_concurrent_streams_match_their_solo_text(server, client):
    alone = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS}
    before = metric(server, "jaxllm:request_success_total")
    aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def burst() -> list[str]:
        return await asyncio.gather(*[one(PROMPTS[i % 8]) for i in range(64)])

    texts = asyncio.run(burst())
    assert texts == [alone[PROMPTS[i % 8]] for i in range(64)]
    assert metric(server, "jaxllm:request_success_total") - before == 64
    assert metric(server, "jaxllm:time_to_first_token_seconds_count") >= 64
    assert metric(server, "jaxllm:generation_tokens_total") >= 64 * 8


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"model": "tiny", "prompt": "hi",', 400, "JSON decode error"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -2}).encode(), 400, "max_tokens must be in [1, 2147483647]"),
        (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode(), 400, "temperature must be in [0, 100]"),
        (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404, "does not exist"),
        (json.dumps({"model": MODEL, "prompt": "x" * 200}).encode(), 400, "max_model_len is 96"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 200}).encode(), 400, "maximum context length is 96"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, needle):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    got, payload = raw(server, path, body)
    assert got == status, payload
    assert needle in payload["error"]["message"] and payload["error"]["code"] == status
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0).choices[0].finish_reason == "length"


def test_api_key_is_required(server):
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    for key in (None, "wrong"):
        status, payload = raw(server, "/v1/completions", body, key=key)
        assert status == 401 and payload["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert raw(server, "/health", key=None)[0] == 200


def test_disconnected_clients_give_their_pages_back(server, client):
    import aiohttp

    async def leave_early(session: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
        async with session.post(server["base"] + "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status == 200
            first = await response.content.readline()  # the first event: generation has started
            assert first.startswith(b"data: {")

    async def burst() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*[leave_early(session) for _ in range(12)])

    aborted = metric(server, "jaxllm:request_success_total", 'finished_reason="abort"')
    asyncio.run(burst())
    deadline = time.time() + 30
    while time.time() < deadline:
        if metric(server, "jaxllm:kv_cache_usage_perc") == 0 and metric(server, "jaxllm:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "jaxllm:kv_cache_usage_perc") == 0, "pages still held by disconnected requests"
    assert metric(server, "jaxllm:request_success_total", 'finished_reason="abort"') - aborted == 12
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0).choices[0].text is not None


def test_pooling_routes_on_a_generative_model_are_400s(server):
    for path in ("/v1/embeddings", "/classify", "/pooling"):
        status, body = raw(server, path, json.dumps({"model": MODEL, "input": "hello"}).encode())
        assert status == 400 and "needs a pooling model" in body["error"]["message"], (path, body)


def test_sigterm_stops_the_server_cleanly_mid_stream(server, client):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=50, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    started = time.time()
    server["proc"].send_signal(signal.SIGTERM)
    assert server["proc"].wait(30) == 0  # a clean stop, not uvicorn's re-raised signal
    assert time.time() - started < 15, "shutdown waited on the running stream"
    with pytest.raises(openai.APIError):
        list(stream)  # the stream is cut off, not left hanging
