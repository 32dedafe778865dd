"""Vision-language architectures beyond LLaVA through `LLM.generate`: the prompt ids transformers'
processor makes and its greedy tokens, for images of different sizes under chunked prefill."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from serving import LLM, SamplingParams
from tests.vlm_families import VIDEO_TOKEN, VIDEO_TOKEN_ID, VLM_CASES, hf_inputs
from tests.vlm_models import random_image

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
IMAGES = [random_image(1, (40, 70)), random_image(2, (64, 30))]


# One architecture in CI (the engine path is shared); the others with the slow tests.
@pytest.mark.parametrize("name", [name if name == "llava_onevision" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in VLM_CASES])
def test_generate_with_images_equals_transformers(name, tmp_path):
    case = VLM_CASES[name]
    ref = case.build(tmp_path)
    # 16-token chunks split every image's placeholders over steps, but Gemma 3's: its 4 soft tokens at 31..34
    # attend to each other both ways, and the chunk that would split them stops before them (a split shows in
    # the log-probabilities).
    llm = LLM(tmp_path, max_model_len=256, page_size=4, num_pages=256, max_num_seqs=4, max_num_batched_tokens=16)
    text = f"user: what do you see in it: {case.image_marker} this picture?\nassistant:"
    params = dataclasses.replace(GREEDY, logprobs=0)
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": image}} for image in IMAGES], params)
    for output, image in zip(outputs, IMAGES):
        assert_generation_equals(output, ref, hf_inputs(case, tmp_path, text, [image]))
    chat_prompt_equals_processors(llm, case, tmp_path)
    if case.video:
        video_generate_equals_transformers(llm, ref, tmp_path)


def assert_generation_equals(output, ref, inputs: dict) -> None:
    """Our greedy `output` (with log-probs) equals transformers' `ref.generate` on the processor's `inputs`: the
    prompt ids, every token, and each token's log-probability within 1e-4."""
    assert output.prompt_token_ids == inputs["input_ids"][0].tolist()
    expected = ref.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    tokens = output.outputs[0].token_ids
    assert tokens == expected.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    hf_logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(expected.logits, tokens)]
    np.testing.assert_allclose([step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens)],
                               hf_logprobs, atol=1e-4)


def chat_prompt_equals_processors(llm: LLM, case, folder) -> None:
    """`LLM.chat` renders the checkpoint's template and tokenizes it itself (through the processor's rewrite of
    the text, Gemma 3's): the prompt is the processor's."""
    from transformers import AutoTokenizer

    from serving.multimodal.images import to_rgb

    parts = [{"type": "text", "text": "what is in "}, {"type": "image"}, {"type": "text", "text": "?"}]
    text = AutoTokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": parts}],
                                                                     tokenize=False, add_generation_prompt=True)
    parts[1] = {"type": "image_pil", "image_pil": to_rgb(IMAGES[0])}
    output = llm.chat([{"role": "user", "content": parts}], GREEDY)[0]
    assert output.prompt_token_ids == hf_inputs(case, folder, text, IMAGES[:1])["input_ids"][0].tolist()


def video_generate_equals_transformers(llm: LLM, ref, folder) -> None:
    """A video given as a list of frames: each frame as the image processor's base view, pooled rows."""
    import torch

    from serving.multimodal.images import load_image_processor
    from serving.multimodal.inputs import Video

    frames = [random_image(seed, (30, 40)) for seed in (3, 4, 5)]
    output = llm.generate({"prompt": f"user: what happens in {VIDEO_TOKEN}?\nassistant:",
                           "multi_modal_data": {"video": frames}}, GREEDY)[0]
    ids = torch.tensor([output.prompt_token_ids])
    assert ids[0].tolist().count(VIDEO_TOKEN_ID) == 3 * 2 * 2 + 1  # 4x4 rows pooled to 2x2 per frame, a newline
    pixels = torch.tensor(Video(frames).pixels(load_image_processor(folder))[None])
    expected = ref.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=MAX_TOKENS,
                            min_new_tokens=MAX_TOKENS, do_sample=False)
    assert output.outputs[0].token_ids == expected[0, ids.shape[1]:].tolist()


def test_mllama_cross_attention_equals_transformers(tmp_path):
    """Mllama reads its images by cross attention from each slot's `CrossKV` rows: two images of different tile
    grids in one prompt (text before the first: transformers' masked rows), one image, and text only, under
    chunked prefill and forced preemption (a recomputed sequence refills its slot); the same text with
    another image gives another answer."""
    from tests.vlm_families import MLLAMA_IMAGE_TOKEN as IMG

    case = VLM_CASES["mllama"]
    ref = case.build(tmp_path)
    # 12 pages of 4 tokens cannot hold the four sequences at once: some are preempted and recomputed. Two step
    # shapes compile (8 or 16 tokens, 8 pages).
    llm = LLM(tmp_path, max_model_len=32, page_size=4, num_pages=12, max_num_seqs=4, max_num_batched_tokens=16,
              min_token_bucket=8, limit_mm_per_prompt={"image": 2})
    third = random_image(3, (20, 40))  # a 1x2 grid of tiles
    requests = [(f"a {IMG} b c {IMG} what are they?", IMAGES), (f"user: {IMG} what is this?", IMAGES[:1]),
                (f"user: {IMG} what is this?", [third]), ("user: tell me a story?", [])]
    params = dataclasses.replace(GREEDY, logprobs=0)
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": images}} if images else text
                            for text, images in requests], params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.images.num_encoded > 4  # every image once, and again for the preempted
    for output, (text, images) in zip(outputs, requests):
        if images:
            inputs = hf_inputs(case, tmp_path, text, images)
        else:
            inputs = {"input_ids": torch.tensor([output.prompt_token_ids])}
        assert_generation_equals(output, ref, inputs)
    assert outputs[1].outputs[0].token_ids != outputs[2].outputs[0].token_ids
    # Slots keep a finished sequence's images: the text-only prompt in every slot still skips the cross layers.
    again = llm.generate(requests[3][0], dataclasses.replace(GREEDY, n=4))[0]
    assert [o.token_ids for o in again.outputs] == [outputs[3].outputs[0].token_ids] * 4


@pytest.mark.parametrize("pattern", ["a I b c I d", "I I a b I c", "a b I I"])
def test_mllama_image_segments_follow_the_processors_mask(pattern):
    """The positions that see each image and its real rows, against `MllamaProcessor`'s dense mask, consecutive
    images (which transformers groups) included; positions past the prompt see what its last token sees."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from model_lib.vision.mllama import MllamaConfig
    from model_lib.vision.mllama_vision import MllamaVisionConfig
    from serving.multimodal.mllama import MllamaImageInputs, image_segments

    vision = MllamaVisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_global_layers=1, num_heads=2,
                                image_size=16, patch_size=4, max_num_tiles=4,
                                supported_aspect_ratios=((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1),
                                                         (4, 1)), intermediate_layers=(0,), vision_output_dim=16)
    config = MllamaConfig(vision=vision, image_token_id=9, cross_attention_layers=(0,), max_images=4)
    ids = [9 if c == "I" else 5 for c in pattern.split()]
    images = [random_image(seed, size) for seed, size in zip(range(3), [(40, 70), (64, 30), (20, 40)])]
    inputs = MllamaImageInputs(config, MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4), 4)
    expanded, items = inputs(ids, images[: ids.count(9)])
    assert expanded == ids and [item.offset for item in items] == [i for i, t in enumerate(ids) if t == 9]
    segments = image_segments(config, ids, items)
    tiles = [item.pixel_values.shape[0] * item.pixel_values.shape[1] for item in items]
    assert tiles == [4, 3, 2][: len(items)]  # tile grids 2x2, 3x1, 1x2
    dense = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, 9)], [tiles], 4,
                                                         len(ids))[0]  # [L, I, T]
    positions = np.arange(len(ids) + 3)
    rows = np.where((segments[None, :, 0] <= positions[:, None]) & (positions[:, None] < segments[None, :, 1]),
                    segments[None, :, 2], 0)[:, : len(items)]  # [L + 3, I] rows each position sees
    expected = dense.sum(-1) * vision.tile_tokens
    np.testing.assert_array_equal(rows, np.concatenate([expected, np.repeat(expected[-1:], 3, axis=0)]))
