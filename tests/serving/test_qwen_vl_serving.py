"""Qwen-VL and GLM-4.1V through the engine and the offline API: greedy tokens equal transformers' for images of
two sizes, two images in one prompt and text alone, under chunked prefill, the encoder budget, prefix
caching and preemption (Qwen3-VL: the DeepStack sets ride with each chunk's image rows); different
images never share KV."""

from __future__ import annotations

import pytest

from serving import LLM, SamplingParams
from tests.qwen_vl_models import (ARCHITECTURES, IMAGE_TOKEN_ID, QWEN3_ARCHITECTURES, SERVING_ARCHITECTURES,
                                  build_qwen_vl, hf_greedy, image_marker)
from tests.vlm_models import random_image

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
IMAGE = image_marker(ARCHITECTURES[1])
PROMPT = f"user: what is in {IMAGE} this?\nassistant:"
# 8-token chunks split each image's placeholders over steps; a 24-token encoder budget holds one image
# (16 or 12 tokens) per step but not two; 18 pages of 4 tokens (the longest request) cannot hold the four requests at once,
# so some are preempted and recomputed.
ENGINE = dict(max_model_len=72, page_size=4, num_pages=18, max_num_seqs=4, max_num_batched_tokens=8,
              max_num_encoder_input_tokens=24)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    built = {}

    def get(architecture: str):
        if architecture not in built:
            folder = tmp_path_factory.mktemp(f"serve-{architecture}")
            ref = build_qwen_vl(folder, architecture)
            built[architecture] = (LLM(folder, **ENGINE), ref)
        return built[architecture]

    return get


@pytest.mark.parametrize("architecture", SERVING_ARCHITECTURES)
def test_generate_with_images_equals_transformers(served, architecture):
    llm, ref = served(architecture)
    image = image_marker(architecture)
    images = [random_image(1), random_image(2, (24, 56))]
    prompts = [{"prompt": f"user: what is in {image} this?\nassistant:", "multi_modal_data": {"image": i}}
               for i in images]
    prompts.append("user: no image here\nassistant:")
    prompts.append({"prompt": f"user: {image} and {image}?\nassistant:", "multi_modal_data": {"image": images[::-1]}})
    preempted = llm.engine.scheduler.num_preemptions
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > preempted
    for output, used, tokens in zip(outputs, ([images[0]], [images[1]], [], images[::-1]), (16, 12, 0, 28)):
        assert output.prompt_token_ids.count(IMAGE_TOKEN_ID) == tokens
        assert output.outputs[0].token_ids == hf_greedy(ref, output.prompt_token_ids, used, MAX_TOKENS)
    assert outputs[0].outputs[0].token_ids != outputs[1].outputs[0].token_ids


def test_same_text_different_images_never_share_kv(served):
    llm, _ = served(ARCHITECTURES[1])
    pool = llm.engine.pool

    def run(image):
        hits = pool.prefix_hits
        output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, GREEDY)[0]
        return output.outputs[0].token_ids, pool.prefix_hits - hits, output.prompt_token_ids.index(IMAGE_TOKEN_ID)

    a, _, image_start = run(random_image(5))
    b, hits, _ = run(random_image(6))
    assert a != b and hits <= image_start
    again, hits, _ = run(random_image(5))
    assert again == a and hits > image_start  # pages holding the same image are reused (the small pool evicts some)


def test_images_over_the_encoder_budget_are_refused(served, monkeypatch):
    llm, _ = served(ARCHITECTURES[1])
    monkeypatch.setattr(llm.engine.images, "budget", 15)  # the 40x48 image takes 16 tokens
    with pytest.raises(ValueError, match="exceeds the encoder budget"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": random_image(7)}}, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_videos_are_refused_clearly(served):
    llm, _ = served(QWEN3_ARCHITECTURES[0])
    with pytest.raises(ValueError, match="this model takes no video"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": [random_image(8), random_image(9)]}}, GREEDY)
