"""`serve` on each tiny vision-language architecture beyond LLaVA, driven by the openai client with a
base64 image: the reply is transformers' greedy generation for the same chat, image and processor."""

from __future__ import annotations

import base64
import signal
import subprocess

import openai
import pytest

from tests.serving.helpers import start_server
from tests.vlm_families import VLM_CASES, hf_inputs
from tests.vlm_models import png_bytes, random_image

pytestmark = pytest.mark.xdist_group("vlm_families_server")
MAX_TOKENS = 6
IMAGE = random_image(21, (50, 36))


def hf_reply(case, folder, ref) -> str:
    """transformers' greedy reply to the chat below, rendered by the checkpoint's template."""
    from transformers import AutoTokenizer

    from serving.multimodal.images import decode_image

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "what is in "}, {"type": "image"},
                                      {"type": "text", "text": "?"}]}], tokenize=False, add_generation_prompt=True)
    inputs = hf_inputs(case, folder, text, [decode_image(png_bytes(IMAGE))])
    out = ref.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow  # a server per architecture; tests/serving/test_llava_server.py covers the image API in CI
@pytest.mark.parametrize("name", list(VLM_CASES))
def test_base64_image_equals_transformers(name, tmp_path):
    case = VLM_CASES[name]
    ref = case.build(tmp_path)
    base, proc, _ = start_server(
        [str(tmp_path), "--served-model-name", name, "--max-model-len", "256", "--page-size", "4", "--num-pages", "256",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--log-level", "warning"]
    )
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE)).decode()
        messages = [{"role": "user", "content": [{"type": "text", "text": "what is in "},
                                                 {"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "?"}]}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == MAX_TOKENS
        assert reply.choices[0].message.content == hf_reply(case, tmp_path, ref)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: the reply was checked, the shutdown is not the test
            proc.kill()
            proc.wait(30)
