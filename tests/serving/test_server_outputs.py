"""The server in-process (its ASGI app called directly): it asks the engine for DELTA outputs, and a
streamed response adds up to the whole one."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving import LLM, RequestOutputKind
from serving.async_engine import AsyncLLMEngine
from serving.openai.app import OpenAIServer

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("server_outputs")

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    return LLM(folder, max_model_len=48, page_size=4, max_num_batched_tokens=32, max_num_seqs=8)


async def post(app, path: str, body: dict) -> tuple[int, str]:
    """One POST through the ASGI app: (status, body text); the client stays connected until the end."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    status, chunks, done, asked = None, [], asyncio.Event(), False

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(chunks).decode()


def close(got, want) -> bool:
    """Equal, floats within 1e-5 (the batch shapes differ between the runs: float noise in logprobs)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    return got == pytest.approx(want, abs=1e-5) if isinstance(want, float) else got == want


def events(text: str) -> list[dict]:
    data = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_streamed_deltas_add_up_to_the_whole_response(llm, monkeypatch):
    kinds = []  # the output kind of every request the engine received
    add_request = llm.engine.add_request

    def spy(request_id, prompt_ids, params, *rest, **options):
        kinds.append(params.output_kind)
        add_request(request_id, prompt_ids, params, *rest, **options)

    monkeypatch.setattr(llm.engine, "add_request", spy)
    engine = AsyncLLMEngine(llm.engine)
    server = OpenAIServer(engine, llm.tokenizer, MODEL)
    app = server.app()

    def metrics() -> tuple[float, float]:
        """(generated tokens, requests with a time to first token) so far."""
        read = server.metrics.registry.get_sample_value
        labels = {"model_name": MODEL}
        return read("jaxllm:generation_tokens_total", labels), read("jaxllm:time_to_first_token_seconds_count", labels)
    base = dict(model=MODEL, prompt="12345", temperature=0, max_tokens=12, ignore_eos=True)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "12345"}], temperature=0, max_tokens=12, n=2,
                logprobs=True, top_logprobs=2)

    async def scenario():
        _, free = await post(app, "/v1/completions", base)
        greedy = json.loads(free)["choices"][0]["text"]
        stop = greedy[3:5]  # held back while streaming, cut from the text (here inside a token)
        body = {**base, "n": 2, "stop": [stop], "logprobs": 2, "echo": True}
        before = metrics()
        status, whole = await post(app, "/v1/completions", body)
        assert status == 200
        counted = tuple(after - b for after, b in zip(metrics(), before))
        status, streamed = await post(app, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert status == 200
        _, chat_whole = await post(app, "/v1/chat/completions", {**chat, "stop": [stop]})
        _, chat_streamed = await post(app, "/v1/chat/completions", {**chat, "stop": [stop], "stream": True})
        return stop, greedy, json.loads(whole), events(streamed), counted, json.loads(chat_whole), events(chat_streamed)

    engine.start()
    try:
        stop, greedy, whole, chunks, counted, chat_whole, chat_chunks = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert kinds and set(kinds) == {RequestOutputKind.DELTA}
    assert len(stop) == 2 and greedy.find(stop) >= 2
    usage = chunks[-1]["usage"]
    assert usage == whole["usage"] and counted == (usage["completion_tokens"], 1)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    for choice in whole["choices"]:
        parts = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        assert choice["text"] == base["prompt"] + greedy[: greedy.find(stop)] and choice["finish_reason"] == "stop"
        assert [p["finish_reason"] for p in parts] == [None] * (len(parts) - 1) + ["stop"]
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            assert close(sum((p["logprobs"][key] for p in parts), []), choice["logprobs"][key])
    for choice in chat_whole["choices"]:
        parts = [c["choices"][0] for c in chat_chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["delta"].get("content", "") for p in parts) == choice["message"]["content"]
        assert close(sum((p["logprobs"]["content"] for p in parts[1:]), []), choice["logprobs"]["content"])
        assert parts[-1]["finish_reason"] == choice["finish_reason"]
