"""`serve` on tiny random Qwen2-VL, Qwen2.5-VL and (slow tier) Qwen3-VL and GLM-4.1V checkpoints, driven by the
openai client with a base64 image: the tokens of transformers' greedy generation, streamed and whole."""

from __future__ import annotations

import base64
import signal

import openai
import pytest

from tests.qwen_vl_models import IMAGE_TOKEN_ID, SERVER_ARCHITECTURES, build_qwen_vl, hf_greedy, processed
from tests.serving.helpers import start_server
from tests.vlm_models import png_bytes, random_image

pytestmark = pytest.mark.xdist_group("qwen_vl_server")
MODEL = "tiny-qwen-vl"
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=SERVER_ARCHITECTURES)
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_qwen_vl(folder, request.param)
    base, proc, _ = start_server(
        [str(folder), "--served-model-name", MODEL, "--max-model-len", "96", "--page-size", "4", "--num-pages", "64",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--log-level", "warning"]
    )
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    yield dict(folder=folder, ref=ref, client=client, architecture=request.param)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def expected_text(setup, image) -> str:
    """transformers' greedy reply to the chat below, its image placeholder expanded by the image's grid."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["folder"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "what is in "}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        tokenize=True, add_generation_prompt=True, return_dict=False)
    (t, h, w), = processed([image], setup["architecture"])[1].tolist()
    at = ids.index(IMAGE_TOKEN_ID)
    ids = ids[:at] + [IMAGE_TOKEN_ID] * (t * h * w // 4) + ids[at + 1:]
    return tokenizer.decode(hf_greedy(setup["ref"], ids, [image], MAX_TOKENS), skip_special_tokens=True)


def test_base64_image_streamed_and_whole_equal_transformers(setup):
    image = random_image(10)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is in "},
                                             {"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "?"}]}]
    options = dict(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = setup["client"].chat.completions.create(**options)
    assert whole.usage.prompt_tokens > 16 and whole.usage.completion_tokens == MAX_TOKENS
    chunks = list(setup["client"].chat.completions.create(**options, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == expected_text(setup, image)
