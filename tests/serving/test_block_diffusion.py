"""SDAR block diffusion decoding (serving/block_diffusion.py) against the torch reference of
tests/sdar_reference.py (JetAstra/SDAR's `block_diffusion_generate`), token for token.

One batch of prompts of lengths 5, 8 and 3 (blocks of 4: a prompt tail in the first block, a
prompt on a block boundary, a short one) per remasking setting; a stop token that falls inside
a block; the same through `LLM.generate` (serving/engine/diffusion_engine.py); the bounds of the parameters.
"""

from __future__ import annotations

import pytest

import model_lib
from serving import LLM, SamplingParams
from serving.engine.engine import EngineConfig, LLMEngine
from serving.block_diffusion import BlockDiffusionParams, block_diffusion_generate, num_transfer_tokens
from tests import sdar_reference
from tests.serving.helpers import token_prompts

CASE = "sdar-block-causal"
PROMPTS = [[5, 17, 33, 60, 91], [7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 42]]
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def sdar(tiny_checkpoint):
    folder, reference = tiny_checkpoint(CASE)
    return folder, reference, model_lib.from_pretrained(folder)


def _reference(reference, prompt: list[int], diffusion: BlockDiffusionParams, stops: tuple[int, ...] = ()) -> list[int]:
    """The reference's tokens after the prompt, cut at the first stop token and at MAX_TOKENS."""
    steps = diffusion.steps_for(reference.block_size)
    out = reference.block_diffusion_generate(
        prompt, gen_length=MAX_TOKENS, denoising_steps=steps, remasking_strategy=diffusion.remasking_strategy,
        confidence_threshold=diffusion.confidence_threshold, stop_token_ids=stops)[len(prompt):]
    stop_at = next((i for i, t in enumerate(out) if t in stops), None)
    return (out if stop_at is None else out[: stop_at + 1])[:MAX_TOKENS]


@pytest.mark.parametrize(
    "diffusion",
    [
        BlockDiffusionParams(),  # one token a pass, most confident first
        BlockDiffusionParams(denoising_steps=3, remasking_strategy="low_confidence_static"),  # 2, 1, 1 a pass
        # The tiny model's confidences spread over about 0.5-0.95 (LOGIT_GAIN): this threshold takes some, not all.
        BlockDiffusionParams(denoising_steps=2, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.7),
        BlockDiffusionParams(denoising_steps=2, remasking_strategy="sequential"),
    ],
    ids=["static-4", "static-3", "dynamic-2", "sequential-2"],
)
def test_greedy_block_diffusion_matches_the_reference(sdar, diffusion):
    _, reference, model = sdar
    ours = block_diffusion_generate(model, PROMPTS, GREEDY, diffusion)
    assert ours == [_reference(reference, p, diffusion) for p in PROMPTS]
    assert all(len(o) == MAX_TOKENS for o in ours)
    # Alone, a prompt decodes the same as in the batch.
    assert block_diffusion_generate(model, PROMPTS[:1], GREEDY, diffusion) == ours[:1]


def test_dynamic_threshold_commits_several_tokens_a_pass(sdar):
    """The dynamic row above is not the static one in disguise: a low threshold changes the output."""
    _, _, model = sdar
    static = block_diffusion_generate(model, PROMPTS, GREEDY, BlockDiffusionParams(denoising_steps=2))
    dynamic = block_diffusion_generate(
        model, PROMPTS, GREEDY,
        BlockDiffusionParams(denoising_steps=2, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.7))
    assert static != dynamic


def test_stop_token_inside_a_block(sdar):
    """A stop token in the middle of a block ends the output there; later blocks are never decoded."""
    _, reference, model = sdar
    diffusion, prompt = BlockDiffusionParams(), PROMPTS[0]
    free = _reference(reference, prompt, diffusion)
    # The first generated token that first appears neither at a block's end nor at the output's end.
    index = next(i for i, t in enumerate(free[:-1]) if free.index(t) == i and (len(prompt) + i) % 4 != 3)
    stop = free[index]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], ignore_eos=True)
    ours = block_diffusion_generate(model, PROMPTS, params, diffusion)
    assert ours[0] == _reference(reference, prompt, diffusion, (stop,)) == free[: index + 1]
    # The EOS of the config stops the same way (ignore_eos off).
    eos = block_diffusion_generate(model, [prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), diffusion,
                                   eos_token_ids=(stop,))
    assert eos == [free[: index + 1]]


def test_sampling_is_seeded_and_stays_in_the_filters(sdar):
    _, _, model = sdar
    params = SamplingParams(temperature=0.8, top_k=3, top_p=0.9, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = block_diffusion_generate(model, PROMPTS, params)
    assert first == block_diffusion_generate(model, PROMPTS, params)
    assert all(len(o) == MAX_TOKENS and all(0 <= t < 128 for t in o) for o in first)


def test_num_transfer_tokens():
    assert num_transfer_tokens(4, 4) == [1, 1, 1, 1]
    assert num_transfer_tokens(4, 3) == [2, 1, 1]
    assert num_transfer_tokens(8, 3) == [3, 3, 2]
    assert num_transfer_tokens(4, 3) == sdar_reference.num_transfer_tokens(4, 3)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(denoising_steps=0), "denoising_steps must be a positive integer"),
        (dict(denoising_steps=2.0), "denoising_steps must be a positive integer"),
        (dict(remasking_strategy="entropy_bounded"), "unknown remasking_strategy 'entropy_bounded'"),
        (dict(confidence_threshold=1.5), r"confidence_threshold must be in \[0, 1\]"),
    ],
)
def test_parameter_bounds(options, match):
    with pytest.raises(ValueError, match=match):
        BlockDiffusionParams(**options)


def test_more_steps_than_the_block_is_refused(sdar):
    _, _, model = sdar
    with pytest.raises(ValueError, match=r"denoising_steps \(5\) must not exceed the block size \(4\)"):
        block_diffusion_generate(model, PROMPTS, GREEDY, BlockDiffusionParams(denoising_steps=5))


def test_positions_past_the_model_are_refused(sdar):
    _, _, model = sdar
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than the model's {limit}"):
        block_diffusion_generate(model, [[5] * limit], GREEDY)


def test_llm_generate_decodes_by_blocks_like_the_reference(sdar):
    """Through the paged engine, one pass per step with the prompts side by side: the reference's tokens,
    the prompt blocks prefilled in chunks of whole blocks (a budget of 8 tokens), and an EOS inside a block."""
    folder, reference, _ = sdar
    diffusion = BlockDiffusionParams(denoising_steps=3)
    llm = LLM(folder, max_model_len=32, max_num_seqs=4, max_num_batched_tokens=8, page_size=4,
              block_diffusion=diffusion)
    outputs = llm.generate(token_prompts(PROMPTS), GREEDY)
    expected = [_reference(reference, p, diffusion) for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert llm.engine.pool.num_free() == llm.engine.pool.num_pages

    free = expected[1]
    index = next(i for i, t in enumerate(free[:-1]) if free.index(t) == i and (len(PROMPTS[1]) + i) % 4 != 3)
    stop = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[free[index]], ignore_eos=True)
    stopped = llm.generate(token_prompts(PROMPTS), [GREEDY, stop, GREEDY])
    assert stopped[1].outputs[0].token_ids == free[: index + 1] and stopped[1].outputs[0].finish_reason == "stop"
    assert [stopped[0].outputs[0].token_ids, stopped[2].outputs[0].token_ids] == [expected[0], expected[2]]

    sampled = SamplingParams(temperature=0.8, top_k=3, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(token_prompts(PROMPTS), sampled)]
    assert first == [o.outputs[0].token_ids for o in llm.generate(token_prompts(PROMPTS), sampled)]
    assert all(len(t) == MAX_TOKENS for t in first) and first != expected


def test_llm_refuses_what_block_diffusion_does_not_serve(sdar, tiny_checkpoint):
    folder, _, _ = sdar
    llm = LLM(folder, max_model_len=30, max_num_seqs=2, page_size=4)
    with pytest.raises(ValueError, match="block diffusion decoding does not support logprobs"):
        llm.generate(token_prompts(PROMPTS[:1]), SamplingParams(max_tokens=4, logprobs=2))
    with pytest.raises(ValueError, match="in whole blocks of 4, exceed max_model_len=30"):  # positions 28-31
        llm.generate(token_prompts([[5] * 28]), SamplingParams(max_tokens=2))
    llama, _ = tiny_checkpoint("llama-gqa")
    with pytest.raises(ValueError, match="block_diffusion is for block diffusion models"):
        LLM(llama, max_model_len=32, block_diffusion=BlockDiffusionParams())


def test_llm_engine_refuses_block_diffusion_by_name(sdar):
    _, _, model = sdar
    with pytest.raises(NotImplementedError, match="SDARForCausalLM: LLMEngine decodes token by token"):
        LLMEngine(model, None, EngineConfig(max_model_len=32, max_num_seqs=2, page_size=4))
