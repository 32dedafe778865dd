"""Fault injection against the real `serve` process: hostile inputs, limits, a schemathesis fuzz run,
disconnect storms, overload with preemption, and a device failure.

One server for the module (tiny KV pool, so that overload preempts); the device-failure
case starts its own (tests/serving/device_fault_server.py).
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from serving.default_model import BUNDLED_MODEL
from tests.serving.device_fault_server import FAULT_PROMPT
from tests.serving.helpers import start_server

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("server_faults")

API_KEY = "sk-faults"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 512 * 1024
FLAGS = [
    "--served-model-name", MODEL, "--api-key", API_KEY, "--protect-metrics", "--max-model-len", "64",
    "--page-size", "4", "--num-pages", "24", "--max-num-seqs", "16", "--max-num-batched-tokens", "128",
    "--max-n", "4", "--max-logprobs", "5", "--max-stop", "4", "--max-stop-len", "16",
    "--max-body-size", str(MAX_BODY), "--log-level", "warning",
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    base, proc, lines = start_server([str(folder), *FLAGS])
    yield dict(base=base, proc=proc, lines=lines)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def connect(server) -> http.client.HTTPConnection:
    url = urlparse(server["base"])
    return http.client.HTTPConnection(url.hostname, url.port, timeout=120)


def send(conn, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request on a kept-alive connection: (status, JSON or text)."""
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def ok_completion(conn) -> None:
    body = json.dumps({"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": 0}).encode()
    status, payload = send(conn, "POST", "/v1/completions", body)
    assert status == 200 and payload["choices"][0]["finish_reason"] == "length", payload


def metric(server, name: str, label: str = "") -> float:
    import re

    _, text = send(connect(server), "GET", "/metrics")
    found = re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
    return sum(float(value) for labels, value in found if label in labels)


def completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", **fields}).encode()


def chat(content, **fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}).encode()


DEEP = b'{"model": "tiny", "prompt": "hi", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"
CASES = [
    # (name, method, path, body, extra headers, status, needle in the message)
    ("top_k >= 2^31", "POST", "/v1/completions", completion(top_k=2**31), {}, 400, "top_k must be in [-1, 2147483647]"),
    ("top_k >= 2^31 greedy", "POST", "/v1/completions", completion(top_k=2**31, temperature=0), {}, 400, "top_k must be in"),
    ("seed beyond int64", "POST", "/v1/completions", completion(seed=2**63), {}, 400, "seed must be in"),
    ("NaN temperature", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', {}, 400, "temperature must be in"),
    ("max_tokens 0", "POST", "/v1/completions", completion(max_tokens=0), {}, 400, "max_tokens must be in"),
    ("n over --max-n", "POST", "/v1/completions", completion(n=5), {}, 400, "at most 4 per request (--max-n)"),
    ("prompts x n over --max-n", "POST", "/v1/completions", completion(prompt=["a", "b", "c"], n=2), {}, 400, "3 prompt(s) x n=2"),
    ("logprobs over the cap", "POST", "/v1/completions", completion(logprobs=6), {}, 400, "at most 5 (max_logprobs)"),
    ("top_logprobs over the cap", "POST", "/v1/chat/completions", chat("hi", logprobs=True, top_logprobs=6), {}, 400, "max_logprobs"),
    ("too many stop strings", "POST", "/v1/completions", completion(stop=list("abcde")), {}, 400, "at most 4 (max_stop)"),
    ("a long stop string", "POST", "/v1/completions", completion(stop=["x" * 17]), {}, 400, "longer than 16 characters"),
    ("prompt over max_model_len", "POST", "/v1/completions", completion(prompt="x" * 200), {}, 400, "max_model_len is 64"),
    ("prompt + max_tokens over", "POST", "/v1/completions", completion(max_tokens=100), {}, 400, "maximum context length is 64"),
    ("token ids out of the vocabulary", "POST", "/v1/completions", completion(prompt=[5, 10**6]), {}, 400, "prompt token ids must be integers"),
    ("text part with a number", "POST", "/v1/chat/completions", chat([{"type": "text", "text": 5}]), {}, 400, "text: Input should be a valid string"),
    ("text part with null", "POST", "/v1/chat/completions", chat([{"type": "text", "text": None}]), {}, 400, "needs a string `text`"),
    ("image part without a url", "POST", "/v1/chat/completions", chat([{"type": "image_url"}]), {}, 400, "needs `image_url`"),
    ("image for a text model", "POST", "/v1/chat/completions",
     chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]), {}, 400, "takes no images"),
    ("lone surrogate in a prompt", "POST", "/v1/completions", completion(prompt="a\ud800b"), {}, 400, "prompt holds a lone UTF-16 surrogate"),
    ("lone surrogate in chat", "POST", "/v1/chat/completions", chat("\udfff"), {}, 400, "messages[0].content holds a lone"),
    ("lone surrogate in the model", "POST", "/v1/completions", json.dumps({"model": "\ud800", "prompt": "hi"}).encode(), {}, 400, "model holds a lone"),
    ("lone surrogate in a key", "POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "\ud800": 1}).encode(), {}, 400, "(a key)"),
    ("invalid UTF-8", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', {}, 400, "not valid UTF-8"),
    ("deeply nested JSON", "POST", "/v1/completions", DEEP, {}, 400, "nested too deeply"),
    ("malformed JSON", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi",', {}, 400, "JSON decode error"),
    ("unknown model", "POST", "/v1/completions", json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), {}, 404, "does not exist"),
    ("unknown path", "GET", "/v1/nothing", None, {}, 404, "Not Found"),
    ("wrong method", "GET", "/v1/completions", None, {}, 405, "Method Not Allowed"),
    ("declared body over the cap", "POST", "/v1/completions", b" " * (MAX_BODY + 1), {}, 413, "larger than 524288 bytes"),
    ("wrong key", "POST", "/v1/completions", completion(), {"Authorization": "Bearer sk-wrong"}, 401, "invalid API key"),
    ("metrics need the key", "GET", "/metrics", None, {"Authorization": ""}, 401, "invalid API key"),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error_and_the_connection_goes_on(server, name, method, path, body, headers, status, needle):
    conn = connect(server)
    got, payload = send(conn, method, path, body, headers)
    assert got == status, payload
    error = payload["error"]
    assert needle in error["message"] and error["code"] == status and error["type"], payload
    ok_completion(conn)  # same kept-alive connection: not reset after the error


def test_a_body_over_the_cap_is_refused_while_streaming_in(server):
    conn = connect(server)
    chunks = (b'{"model": "tiny", "prompt": "' + b"x" * 65536 for _ in range(16))  # 1 MiB, no Content-Length
    conn.request("POST", "/v1/completions", body=chunks, headers={**AUTH, "Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_negative_seeds_are_served(server, stream):
    body = completion(seed=-1, max_tokens=4, temperature=1.0, stream=stream)
    first = send(connect(server), "POST", "/v1/completions", body)
    assert first[0] == 200 and "error" not in str(first[1])
    if not stream:
        assert send(connect(server), "POST", "/v1/completions", body)[1]["choices"] == first[1]["choices"]


def test_openapi_declares_what_is_sent(server):
    _, schema = send(connect(server), "GET", "/openapi.json")
    assert "422" not in json.dumps(schema)
    for path in ("/v1/completions", "/v1/chat/completions"):
        declared = set(schema["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "500", "503"} <= declared
    assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["top_k"]["maximum"] == 2**31 - 1


def test_tokenization_runs_off_the_event_loop(server):
    # A long prompt (under the body cap) takes the tokenizer a second or more; /health must not wait for it.
    body = completion(prompt="the quick brown fox " * 20000)
    done = {}

    def big() -> None:
        done["status"] = send(connect(server), "POST", "/v1/completions", body)[0]
        done["at"] = time.perf_counter()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)
    status, _ = send(connect(server), "GET", "/health")
    answered = time.perf_counter()
    thread.join(120)
    assert status == 200 and done["status"] == 400
    assert answered < done["at"], "/health waited for the tokenizer"


def _wait_idle(server, timeout: float = 60) -> dict[str, float]:
    names = ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting", "jaxllm:kv_cache_usage_perc")
    deadline = time.time() + timeout
    while True:
        values = {name: metric(server, name) for name in names}
        if not any(values.values()) or time.time() > deadline:
            return values
        time.sleep(0.2)


def test_disconnect_storm_frees_everything(server):
    import aiohttp

    body = {"model": MODEL, "prompt": "storm", "max_tokens": 56, "temperature": 0, "ignore_eos": True}

    async def leave_a_stream(session) -> None:
        async with session.post(server["base"] + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as response:
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: {")

    async def leave_a_request(session, path: str, payload: dict) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(session.post(server["base"] + path, json=payload, headers=AUTH), 0.5)

    async def storm() -> None:
        async with aiohttp.ClientSession() as session:
            leaving = [leave_a_stream(session) for _ in range(12)]
            leaving += [leave_a_request(session, "/v1/completions", {**body, "n": 4}) for _ in range(12)]
            chat_body = {"model": MODEL, "messages": [{"role": "user", "content": "storm"}], "n": 4, "ignore_eos": True}
            leaving += [leave_a_request(session, "/v1/chat/completions", chat_body) for _ in range(6)]
            await asyncio.gather(*leaving)

    aborted = metric(server, "jaxllm:request_success_total", 'finished_reason="abort"')
    asyncio.run(storm())
    leaks = _wait_idle(server)
    print(f"after the disconnect storm (30 clients gone): {leaks}")
    assert not any(leaks.values()), f"work left behind: {leaks}"
    # The 12 streams and most non-streaming requests (n=4: 4 sequences each) were cut short.
    assert metric(server, "jaxllm:request_success_total", 'finished_reason="abort"') - aborted >= 12 + 4 * 12
    ok_completion(connect(server))


def test_overload_with_preemption_gives_the_solo_outputs(server):
    import aiohttp

    prompts = [f"request {i}: " + "abcdefgh"[i % 8] * (4 + i % 9) for i in range(32)]

    def body(prompt: str) -> dict:
        return {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    conn = connect(server)
    solo = [send(conn, "POST", "/v1/completions", json.dumps(body(p)).encode())[1]["choices"][0]["text"] for p in prompts]
    preempted = metric(server, "jaxllm:num_preemptions")

    async def one(session, prompt: str) -> str:
        async with session.post(server["base"] + "/v1/completions", json=body(prompt), headers=AUTH) as response:
            return (await response.json())["choices"][0]["text"]

    async def overload() -> list[str]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[one(session, p) for p in prompts])

    together = asyncio.run(overload())
    mismatches = sum(a != b for a, b in zip(together, solo))
    preemptions = metric(server, "jaxllm:num_preemptions") - preempted
    print(f"overload: {len(prompts)} concurrent requests, {preemptions:.0f} preemptions, {mismatches} mismatches")
    assert preemptions > 0, "the pool was meant to run out"
    assert mismatches == 0
    assert not any(_wait_idle(server).values())


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    """Every check but positive_data_acceptance: limits that depend on the request as a whole
    (prompt length + max_tokens against max_model_len, n against --max-n) are not expressible in the schema."""
    cli = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [str(cli), "run", server["base"] + "/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "25", "--seed", "14",
         "--request-timeout", "60", "--report", "har", "--report-dir", str(tmp_path), "--no-color"],
        capture_output=True, text=True, timeout=400,
    )
    (har,) = tmp_path.glob("*.json")
    statuses = collections.Counter(entry["response"]["status"] for entry in json.loads(har.read_text())["log"]["entries"])
    server_errors = sum(count for status, count in statuses.items() if status >= 500 or status == 0)
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert result.returncode == 0, result.stdout[-4000:]
    assert server_errors == 0 and sum(statuses.values()) > 300
    ok_completion(connect(server))


def test_sigterm_exits_zero(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_device_failure_is_reported_and_the_process_exits_nonzero(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    base, proc, lines = start_server([str(folder), "--max-model-len", "64", "--page-size", "4", "--log-level", "warning"],
                                     module="tests.serving.device_fault_server")
    url = urlparse(base)
    try:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        ok = json.dumps({"model": str(folder), "prompt": [5, 6, 7], "max_tokens": 2}).encode()
        assert send(conn, "POST", "/v1/completions", ok)[0] == 200
        fault = json.dumps({"model": str(folder), "prompt": FAULT_PROMPT, "max_tokens": 2}).encode()
        status, payload = send(conn, "POST", "/v1/completions", fault)
        assert status == 503 and "injected device failure" in payload["error"]["message"], payload
        status, payload = send(http.client.HTTPConnection(url.hostname, url.port, timeout=10), "GET", "/health")
        assert status == 503 and "the engine stopped" in payload["error"]["message"] and "device lost" in payload["error"]["message"]
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("injected device failure" in line for line in lines)


def test_max_model_len_beyond_the_positions_is_refused_at_startup():
    # The bundled model has 64 positions.
    result = subprocess.run([sys.executable, "-m", "serving.openai.cli", str(BUNDLED_MODEL), "--max-model-len", "128", "--port", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "max_model_len=128 is longer than the model's 64 positions" in result.stderr
    assert "--allow-long-max-model-len" in result.stderr
