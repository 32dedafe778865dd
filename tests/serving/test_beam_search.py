"""`LLM.beam_search` (vLLM's offline beam search): without EOS it finds transformers' `generate(num_beams=k)`
beams; the ranking, EOS and context rules are checked on a scripted model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serving.beam_search import BeamSearchParams, BeamSearchSequence, beam_score, beam_search
from serving.outputs import CompletionOutput, Logprob, RequestOutput
from serving.sampling_params import SamplingParams
from tests.serving.helpers import prompts

WIDTH, NEW_TOKENS = 3, 6
pytestmark = pytest.mark.xdist_group("beam_search")  # the server test serves the offline tests' LLM


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    from serving.llm import LLM

    folder, reference = tiny_checkpoint("llama-gqa")
    return LLM(folder, max_num_seqs=8, max_model_len=64, num_pages=64), reference


def test_beams_equal_transformers_beam_search(llama):
    llm, reference = llama
    prompt_ids = prompts((7, 12), seed=3)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompt_ids],
                              BeamSearchParams(beam_width=WIDTH, max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, output in zip(prompt_ids, outputs):
        assert_transformers_beams(reference, prompt, output)
        assert all(beam.finish_reason == "length" and len(beam.logprobs) == NEW_TOKENS for beam in output.sequences)
        assert output.sequences[0].text == llm.tokenizer.decode(output.sequences[0].tokens)
    with pytest.raises(ValueError, match=r"beam_width must be in \[1, 10\]"):
        llm.beam_search("hello", BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="decoder_prompt_ids is for encoder-decoders"):
        llm.engine.add_request("bad", prompt_ids[0], SamplingParams(max_tokens=1), decoder_prompt_ids=[1])


def assert_transformers_beams(reference, prompt: list[int], output) -> None:
    """Our beams (tokens, cum logprobs) are transformers' beam search's with EOS a token like any other (as
    `ignore_eos`); the shared model's generation config is put back after."""
    saved = reference.generation_config.eos_token_id
    reference.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            want = reference.generate(torch.tensor([prompt]), num_beams=WIDTH, num_return_sequences=WIDTH,
                                      do_sample=False, max_new_tokens=NEW_TOKENS, length_penalty=1.0,
                                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    finally:
        reference.generation_config.eos_token_id = saved
    assert [beam.tokens for beam in output.sequences] == want.sequences.tolist()
    # transformers scores a beam by its output's logprob sum over the output length (penalty 1).
    np.testing.assert_allclose([beam.cum_logprob for beam in output.sequences],
                               want.sequences_scores.numpy() * NEW_TOKENS, rtol=1e-4)


def scripted(table: dict[tuple[int, ...], dict[int, float]]):
    """An engine `run` whose next-token logprobs depend on each prompt's last two tokens (`table`)."""

    def run(beams: list[tuple[int, list[int]]], params) -> list[RequestOutput]:
        outs = []
        for _, tokens in beams:
            choices = table[tuple(tokens[-2:])]
            ranked = sorted(choices.items(), key=lambda kv: -kv[1])[: params.logprobs]
            logprobs = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(ranked, 1)}
            completion = CompletionOutput(0, "", [ranked[0][0]], -1.0, [logprobs], "length")
            outs.append(RequestOutput("r", None, tokens, [completion], True))
        return outs

    return run


def test_eos_length_penalty_and_full_context_on_a_scripted_model():
    eos = 9
    lp = math.log
    table = {(0, 1): {2: lp(0.5), 3: lp(0.3), eos: lp(0.2)},
             (1, 2): {eos: lp(0.9), 4: lp(0.1)}, (1, 3): {5: lp(0.6), 6: lp(0.4)},
             (2, 4): {7: lp(1.0)}, (3, 5): {7: lp(1.0)}, (3, 6): {7: lp(1.0)},
             (4, 7): {7: lp(1.0)}, (5, 7): {7: lp(1.0)}, (6, 7): {7: lp(1.0)}}
    params = BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0)
    [out] = beam_search([[0, 1]], params, scripted(table), (eos,), max_model_len=100)
    # [0, 1, 2, eos] ends at 0.5 * 0.9 = 0.45 (length 3 without its EOS); [0, 1, 3, 5, 7] runs to max_tokens
    # at 0.18 (length 5); [0, 1, eos] (0.2, length 2) ranks below both by log(p) / length.
    assert [b.tokens for b in out.sequences] == [[0, 1, 2, eos], [0, 1, 3, 5, 7]]
    assert [b.finish_reason for b in out.sequences] == ["stop", "length"]
    np.testing.assert_allclose(out.sequences[0].cum_logprob, lp(0.45))
    assert beam_score(out.sequences[1], (eos,), 1.0) == pytest.approx(lp(0.18) / 5)
    # A context of 4 tokens: beams stop growing when they fill it.
    [short] = beam_search([[0, 1]], dataclasses_replace(params, ignore_eos=True), scripted(table), (eos,),
                          max_model_len=4)
    assert all(len(b.tokens) <= 4 for b in short.sequences) and short.sequences[0].finish_reason == "length"
    assert isinstance(short.sequences[0], BeamSearchSequence)


def dataclasses_replace(params: BeamSearchParams, **changes) -> BeamSearchParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_encoder_decoder_beams_equal_transformers(tmp_path):
    """BART: the prompt is the source, beams are decoder prompts (`decoder_prompt_ids`) from
    decoder_start_token_id on."""
    from serving.llm import LLM
    from tests.seq2seq_models import build_seq2seq, source_batch
    from tests.tiny_models import build_tokenizer

    reference = build_seq2seq("BartForConditionalGeneration", tmp_path, forced_eos_token_id=None)
    build_tokenizer().save_pretrained(tmp_path)
    llm = LLM(tmp_path, max_num_seqs=8, num_pages=64)
    ids, mask = source_batch((9, 4), seed=5)
    sources = [row[: m.sum()].tolist() for row, m in zip(ids, mask)]
    outputs = llm.beam_search([{"prompt_token_ids": s} for s in sources],
                              BeamSearchParams(beam_width=WIDTH, max_tokens=NEW_TOKENS, ignore_eos=True))
    for source, output in zip(sources, outputs):
        assert_transformers_beams(reference, source, output)
    with pytest.raises(ValueError, match="the decoder prompt must be token ids"):
        llm.engine.add_request("bad", sources[0], SamplingParams(max_tokens=1), decoder_prompt_ids=[10**6])
    assert not llm.engine.requests


def test_completions_with_use_beam_search(llama):
    """vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: the `n` beams of `LLM.beam_search`
    as choices, best first."""
    import openai

    from tests.serving.test_pooling_server import serve_in_thread

    llm, _ = llama
    prompt = prompts((9,), seed=8)[0]
    [offline] = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=WIDTH, max_tokens=4))
    messages = [{"role": "user", "content": "abc"}]
    templated = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer.encode(templated, add_special_tokens=False)
    [chat_beams] = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=2, max_tokens=3))
    with serve_in_thread(None, llm=llm) as server:  # the server's engine thread takes the LLM's engine over
        client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
        response = client.completions.create(model="tiny", prompt=prompt, n=WIDTH, max_tokens=4,
                                             extra_body={"use_beam_search": True})
        assert [c.text for c in response.choices] == [
            llm.tokenizer.decode(beam.tokens[len(prompt):], skip_special_tokens=True) for beam in offline.sequences]
        assert [c.index for c in response.choices] == list(range(WIDTH))
        # Chat: the beams of the templated prompt, as assistant messages.
        chat = client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=3,
                                              extra_body={"use_beam_search": True})
        assert [c.message.content for c in chat.choices] == [
            llm.tokenizer.decode(beam.tokens[len(ids):], skip_special_tokens=True) for beam in chat_beams.sequences]
        for extra, match in [({"stream": True}, "no stream"), ({"n": 11}, "beam_width must be in")]:
            with pytest.raises(openai.BadRequestError, match=match):
                client.completions.create(model="tiny", prompt=prompt, max_tokens=4,
                                          **{"n": WIDTH, **{k: v for k, v in extra.items() if k == "n"}},
                                          stream=extra.get("stream", False), extra_body={"use_beam_search": True})
