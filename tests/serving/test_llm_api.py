"""The offline API: text prompts, stop strings, streaming, logprobs, n samples and seeds."""

from __future__ import annotations

import numpy as np
import pytest

from serving import LLM, SamplingParams

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("llm_api")

CASE = "qwen3-qknorm"
PROMPTS = ["The cat sat on", "Hello, world", "A longer prompt that spans several pages of the cache."]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint(CASE)
    return LLM(folder, max_model_len=96, page_size=8, max_num_batched_tokens=64)


def test_text_prompts_decode_to_the_token_ids(llm):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokenizer = llm.get_tokenizer()
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt == prompt and output.prompt_token_ids == tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert len(completion.token_ids) == 12 and completion.finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text_exactly(llm, include):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = full[9:11]
    cut = full.find(stop)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "never-appears"],
                            include_stop_str_in_output=include)
    completion = llm.generate(PROMPTS[0], params)[0].outputs[0]
    assert completion.text == full[: cut + (len(stop) if include else 0)]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert llm.engine.pool.all_free()


def test_stop_token_ids(llm):
    ids = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids
    completion = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ids[4]], ignore_eos=True))[0].outputs[0]
    assert completion.token_ids == ids[: ids.index(ids[4]) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == ids[4]


def test_stream_grows_to_the_generated_result(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    final = llm.generate(PROMPTS[2], params)[0]
    steps = list(llm.stream(PROMPTS[2], params))
    assert len(steps) == 10 and steps[-1].finished
    assert [len(s.outputs[0].token_ids) for s in steps] == list(range(1, 11))
    for earlier, later in zip(steps, steps[1:]):
        assert later.outputs[0].text.startswith(earlier.outputs[0].text)
    assert steps[-1].outputs[0].text == final.outputs[0].text
    assert steps[-1].outputs[0].token_ids == final.outputs[0].token_ids


def test_streamed_text_never_shows_a_stop_string(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = full[12:15]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop)
    texts = [step.outputs[0].text for step in llm.stream(PROMPTS[0], params)]
    assert texts[-1] == full[: full.find(stop)]
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    crowded = llm.generate(PROMPTS + [PROMPTS[0]], [SamplingParams(temperature=0.8, max_tokens=5)] * 3 + [params])
    assert crowded[-1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_share_the_prompt(llm):
    output = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, ignore_eos=True))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    assert llm.engine.pool.all_free()


def test_logprobs_are_the_models(llm, forward):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True)
    output = llm.generate(PROMPTS[1], params)[0]
    completion = output.outputs[0]
    ids = np.array([output.prompt_token_ids + completion.token_ids[:-1]], np.int32)
    import model_lib

    logits = np.asarray(forward(model_lib.from_pretrained(llm.model_path), ids, np.ones_like(ids)))[0]
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = log_softmax[len(output.prompt_token_ids) - 1 + step]
        assert entry[token].rank == 1 and entry[token].logprob == pytest.approx(row[token], abs=1e-4)
        top2 = np.argsort(-row)[:2]
        assert set(entry) == set(top2.tolist())
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)))

