"""`serve` on tiny pooling checkpoints saved at test time, driven by the `openai` client and raw HTTP:
embeddings equal transformers' pooled output, and the vLLM-shaped classify / score / rerank / pooling
routes equal the offline references."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
import uvicorn

from tests.encoder_models import build_bert_tokenizer, build_encoder, build_reward, padded_inputs
from tests.processes import free_port
from tests.serving.helpers import start_server

pytestmark = pytest.mark.xdist_group("pooling_server")

TEXTS = ["the quick brown fox", "what is the capital of france?", "a cat"]
SERVER_ARGS = ["--served-model-name", "tiny", "--log-level", "warning", "--max-num-seqs", "4"]


def _serve(folder):
    base, proc, lines = start_server([str(folder), *SERVER_ARGS])
    return dict(base=base, proc=proc, lines=lines)


def _stop(server) -> None:
    if server["proc"].poll() is None:
        server["proc"].send_signal(signal.SIGTERM)
        server["proc"].wait(30)


@contextlib.contextmanager
def serve_in_thread(folder, api_key: str | None = None, llm=None):
    """The same app as `serve`, in this process (no second JAX start-up): uvicorn on a thread (`llm`: an
    `LLM` of `folder` to serve, handed over to the server's engine thread)."""
    from serving.async_engine import AsyncLLMEngine
    from serving.llm import LLM
    from serving.openai.app import OpenAIServer

    llm = llm or LLM(folder, max_num_seqs=4)
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    port = free_port()
    app = OpenAIServer(engine, llm.tokenizer, "tiny", api_key, transcriber=llm.transcriber).app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield dict(base=f"http://127.0.0.1:{port}", **({"key": api_key} if api_key else {}))
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()


def post(server, path: str, body: dict) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {server['key']}"} if "key" in server else {})}
    request = urllib.request.Request(server["base"] + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-server")
    ref = build_encoder("BertModel", folder, "BertConfig")
    tokenizer = build_bert_tokenizer(folder)
    server = _serve(folder)
    yield server, ref, tokenizer
    _stop(server)


def _expected_embeddings(ref, tokenizer, texts) -> np.ndarray:
    with torch.no_grad():
        cls = ref(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0].numpy()
    return cls / np.linalg.norm(cls, axis=1, keepdims=True)


def test_openai_client_embeddings_equal_transformers(bert):
    server, ref, tokenizer = bert
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
    expected = _expected_embeddings(ref, tokenizer, TEXTS)
    as_base64 = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    as_floats = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    for response in (as_base64, as_floats):
        np.testing.assert_allclose([d.embedding for d in response.data], expected, atol=2e-6)
        assert response.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)
    one = client.embeddings.create(model="tiny", input=tokenizer.encode(TEXTS[1]), encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected[1], atol=2e-6)


def test_embedding_errors_are_400s(bert):
    server = bert[0]
    cases = [
        ("/v1/embeddings", {"model": "tiny", "input": TEXTS, "dimensions": 8}, "matryoshka"),
        ("/v1/embeddings", {"model": "tiny", "input": [5] * 65}, "maximum input length is 64"),
        ("/v1/embeddings", {"model": "tiny", "input": []}, "empty"),
        ("/v1/completions", {"model": "tiny", "prompt": "the fox"}, "pooling model"),
        ("/classify", {"model": "tiny", "input": TEXTS}, "serves embed, score, encode"),
    ]
    for path, body, needle in cases:
        status, answer = post(server, path, body)
        assert status == 400 and needle in answer["error"]["message"], (path, answer)
    assert post(server, "/v1/embeddings", {"model": "tiny", "input": "a cat"})[0] == 200  # the server goes on


def test_score_rerank_and_pooling_of_an_embedding_model(bert):
    server, ref, tokenizer = bert
    vectors = _expected_embeddings(ref, tokenizer, TEXTS)
    status, answer = post(server, "/score", {"model": "tiny", "text_1": TEXTS[0], "text_2": TEXTS[1:]})
    assert status == 200
    np.testing.assert_allclose([d["score"] for d in answer["data"]], vectors[1:] @ vectors[0], atol=2e-6)
    status, answer = post(server, "/rerank", {"model": "tiny", "query": TEXTS[0], "documents": TEXTS[1:], "top_n": 1})
    best = int(np.argmax(vectors[1:] @ vectors[0]))
    assert status == 200 and [r["index"] for r in answer["results"]] == [best]
    assert answer["results"][0]["document"]["text"] == TEXTS[1 + best]
    status, answer = post(server, "/pooling", {"model": "tiny", "input": TEXTS[2], "encoding_format": "base64"})
    data = np.frombuffer(base64.b64decode(answer["data"][0]["data"]), "<f4")
    np.testing.assert_allclose(data, vectors[2], atol=2e-6)


def test_cross_encoder_and_reward_model_routes(tmp_path):
    ref = build_encoder("BertForSequenceClassification", tmp_path / "ce", "BertConfig", num_labels=1)
    tokenizer = build_bert_tokenizer(tmp_path / "ce")
    with serve_in_thread(tmp_path / "ce", api_key="sk-pool") as server:
        for path in ("/classify", "/score", "/rerank", "/pooling", "/v1/embeddings"):  # --api-key guards them all
            assert post({"base": server["base"]}, path, {"model": "tiny", "input": "a"})[0] == 401
        status, answer = post(server, "/classify", {"model": "tiny", "input": TEXTS})
        with torch.no_grad():
            logits = ref(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()[:, 0]
        assert status == 200 and [d["label"] for d in answer["data"]] == ["LABEL_0"] * 3
        np.testing.assert_allclose([d["probs"][0] for d in answer["data"]], 1 / (1 + np.exp(-logits)), atol=2e-6)
        with torch.no_grad():
            pairs = ref(**tokenizer([TEXTS[0]] * 2, TEXTS[1:], padding=True, return_tensors="pt")).logits.numpy()[:, 0]
        status, answer = post(server, "/v1/rerank", {"model": "tiny", "query": TEXTS[0], "documents": TEXTS[1:]})
        assert status == 200
        got = {r["index"]: r["relevance_score"] for r in answer["results"]}
        np.testing.assert_allclose([got[0], got[1]], 1 / (1 + np.exp(-pairs)), atol=2e-6)
        assert [r["index"] for r in answer["results"]] == list(np.argsort(-pairs))
        status, answer = post(server, "/v1/embeddings", {"model": "tiny", "input": "a cat"})
        assert status == 400 and "serves classify, score, encode" in answer["error"]["message"]
    reward = build_reward("Qwen2ForRewardModel", tmp_path / "rm")
    with serve_in_thread(tmp_path / "rm") as server:
        ids, mask, _ = padded_inputs(seed=3, lengths=(6,))
        status, answer = post(server, "/pooling", {"model": "tiny", "input": ids[0].tolist()})
        with torch.no_grad():
            expected = reward(torch.as_tensor(ids).long(), torch.as_tensor(mask).long()).numpy()[0]
        assert status == 200
        np.testing.assert_allclose(answer["data"][0]["data"], expected, atol=2e-6)
