"""`serve` on a tiny random LLaVA, driven by the openai client with base64 images: the tokens of
transformers' greedy generation, streamed or not; clear 400s for bad or too many images, and local
files only under --allowed-local-media-path."""

from __future__ import annotations

import base64
import signal

import openai
import pytest
import torch

from serving.multimodal.images import load_image_processor
from tests.serving.helpers import start_server
from tests.vlm_models import IMAGE_TOKEN_ID, IMAGE_TOKENS, build_llava, png_bytes, random_image

pytestmark = pytest.mark.xdist_group("llava_server")
MODEL = "tiny-llava"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-server")
    ref = build_llava(folder)
    media = tmp_path_factory.mktemp("media")
    (media / "cat.png").write_bytes(png_bytes(random_image(11)))
    base, proc, lines = start_server(
        [str(folder), "--served-model-name", MODEL, "--max-model-len", "96", "--page-size", "4",
         "--num-pages", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--log-level", "warning",
         "--limit-mm-per-prompt", '{"image": 1}', "--allowed-local-media-path", str(media)]
    )
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    yield dict(folder=folder, ref=ref, media=media, client=client)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(random_image(seed))).decode()


def messages(url: str, images: int = 1) -> list[dict]:
    parts = [{"type": "text", "text": "what is in "}]
    parts += [{"type": "image_url", "image_url": {"url": url}}] * images
    return [{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}]


def expected_text(setup, image_bytes: bytes) -> str:
    """transformers' greedy reply to `messages` with this image, through the checkpoint's own processing."""
    from transformers import AutoTokenizer

    from serving.multimodal.images import decode_image

    tokenizer = AutoTokenizer.from_pretrained(setup["folder"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "what is in "}, {"type": "image"},
                                      {"type": "text", "text": "?"}]}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    at = ids.index(IMAGE_TOKEN_ID)
    ids = ids[:at] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + ids[at + 1:]
    pixels = load_image_processor(setup["folder"])(images=[decode_image(image_bytes)], return_tensors="pt")["pixel_values"]
    out = setup["ref"].generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=MAX_TOKENS,
                                min_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_base64_image_streamed_and_whole_equal_transformers(setup):
    client = setup["client"]
    options = dict(model=MODEL, messages=messages(data_url(10)), max_tokens=MAX_TOKENS, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**options)
    assert whole.usage.prompt_tokens > IMAGE_TOKENS and whole.usage.completion_tokens == MAX_TOKENS
    chunks = list(client.chat.completions.create(**options, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == expected_text(setup, png_bytes(random_image(10)))
    other = client.chat.completions.create(**{**options, "messages": messages(data_url(12))})
    assert other.choices[0].message.content != whole.choices[0].message.content


def test_local_files_only_under_the_allowed_folder(setup, tmp_path):
    client = setup["client"]
    allowed = (setup["media"] / "cat.png").as_uri()
    reply = client.chat.completions.create(model=MODEL, messages=messages(allowed), max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected_text(setup, png_bytes(random_image(11)))
    outside = tmp_path / "dog.png"
    outside.write_bytes(png_bytes(random_image(13)))
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media-path"):
        client.chat.completions.create(model=MODEL, messages=messages(outside.as_uri()), max_tokens=2)


@pytest.mark.parametrize("content, message", [
    (messages("data:image/png;base64," + base64.b64encode(b"not a png").decode()), "cannot decode"),
    (messages("data:image/png;base64,@@@"), "not valid base64"),
    (messages("ftp://example.com/cat.png"), "unsupported image URL scheme"),
    (messages(data_url(14), images=2), "at most 1 per prompt"),
])
def test_bad_images_get_400(setup, content, message):
    with pytest.raises(openai.BadRequestError, match=message):
        setup["client"].chat.completions.create(model=MODEL, messages=content, max_tokens=2)
    # The server goes on.
    assert setup["client"].chat.completions.create(model=MODEL, messages=messages(data_url(15)), max_tokens=1)
