"""LLaVA through the engine and the offline API: greedy tokens equal transformers' with images,
chunked prefill through an image, the encoder budget, and prefix caching keyed by image."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from serving import LLM, SamplingParams
from tests.vlm_models import IMAGE_TOKEN_ID, IMAGE_TOKENS, build_llava, png_bytes, random_image

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPT = "user: what is in <image> this picture?\nassistant:"
ENGINE = dict(max_model_len=96, page_size=4, num_pages=128, max_num_seqs=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-serving")
    return folder, build_llava(folder)


@pytest.fixture(scope="module")
def llm(checkpoint):
    # 8-token chunks split each image's 16 placeholders over steps, and a one-image encoder budget
    # makes a second image (of the same prompt or another) wait for a later step.
    return LLM(checkpoint[0], max_num_batched_tokens=8, max_num_encoder_input_tokens=IMAGE_TOKENS, **ENGINE)


def hf_greedy(ref, prompt_ids: list[int], pixels: np.ndarray) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = ref.generate(input_ids=ids, pixel_values=torch.tensor(pixels), max_new_tokens=MAX_TOKENS, do_sample=False,
                       min_new_tokens=MAX_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def pixels_of(llm: LLM, images: list[np.ndarray]) -> np.ndarray:
    processor = llm.image_inputs.processor
    return processor(images=list(images), return_tensors="np")["pixel_values"]


def test_generate_with_images_equals_transformers(llm, checkpoint):
    """Three requests at once under chunked prefill and the encoder budget: transformers' greedy tokens,
    each image encoded once (its features kept across the chunks of its placeholders)."""
    images = [random_image(1), random_image(2)]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": image}} for image in images]
    prompts.append({"prompt": "user: <image> and <image>?\nassistant:", "multi_modal_data": {"image": images[::-1]}})
    encoded = llm.engine.images.num_encoded
    outputs = llm.generate(prompts, GREEDY)
    for output, used in zip(outputs, ([images[0]], [images[1]], images[::-1])):
        ids = output.prompt_token_ids
        assert ids.count(IMAGE_TOKEN_ID) == IMAGE_TOKENS * len(used)
        assert output.outputs[0].token_ids == hf_greedy(checkpoint[1], ids, pixels_of(llm, used))
    assert outputs[0].outputs[0].token_ids != outputs[1].outputs[0].token_ids
    assert llm.engine.images.num_encoded - encoded == 4
    assert all(item.features is None for seq in llm.engine.scheduler.running for item in seq.images)


def test_same_text_different_images_never_share_kv(llm):
    first, second = random_image(5), random_image(6)
    pool = llm.engine.pool

    def run(image):
        hits = pool.prefix_hits
        output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, GREEDY)[0]
        return output.outputs[0].token_ids, pool.prefix_hits - hits, output.prompt_token_ids.index(IMAGE_TOKEN_ID)

    a, _, image_start = run(first)
    b, hits, _ = run(second)
    assert a != b
    assert hits <= image_start  # only pages before the image are shared; every page holding a placeholder differs
    again, hits, _ = run(first)
    assert again == a and hits > image_start + IMAGE_TOKENS  # the same image reuses its pages


def test_chat_with_image_parts(llm):
    image = random_image(7)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is in "},
                                             {"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": " this picture?"}]}]
    chat = llm.chat(messages, GREEDY)[0]
    pil = [{"role": "user", "content": [{"type": "text", "text": "what is in "},
                                        {"type": "image_pil", "image_pil": __import__("PIL.Image").Image.fromarray(image)},
                                        {"type": "text", "text": " this picture?"}]}]
    direct = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, GREEDY)[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids == llm.chat(pil, GREEDY)[0].outputs[0].token_ids


def test_bad_image_requests_are_refused(llm):
    image = random_image(8)
    cases = [
        ({"prompt": PROMPT, "multi_modal_data": {"image": [image, image]}}, "1 image placeholder"),
        ({"prompt": PROMPT}, "do not match"),
        ({"prompt": PROMPT, "multi_modal_data": {"image": b"not an image"}}, "cannot decode"),
        ({"prompt": PROMPT, "multi_modal_data": {"image": image[..., :2]}}, r"\[H, W, 3\]"),
        ({"prompt": PROMPT, "multi_modal_data": {"video": image}}, "multi_modal_data"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()
    # The engine goes on serving.
    assert llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, GREEDY)[0].outputs[0].token_ids
