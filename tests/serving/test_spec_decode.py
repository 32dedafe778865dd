"""Speculative decoding in the engine: greedy outputs token for token those of plain decoding for
each method over mixed batches (penalties, stops, logprobs, chunked prefill, preemption), the sampled
distribution unchanged, a copy of the target as draft accepting everything in fewer steps, streaming
and metrics. EAGLE-3 heads and DeepSeek-V3 MTP blocks are random (tests/spec_drafts.py): they exercise
the machinery, greedy drafts are almost never accepted, sampled ones often are."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from prometheus_client import generate_latest
from scipy.stats import chi2_contingency

from serving import LLM, RequestOutputKind, SamplingParams
from tests.serving.helpers import prompts, token_prompts
from tests.spec_drafts import add_mtp_block, build_eagle3_checkpoint

pytestmark = pytest.mark.xdist_group("spec_decode")

TARGET = "qwen3-qknorm"
# Few compiled shapes: token buckets 1-16, sequence buckets 1-4, one page-table width (8 pages of 8).
SIZES = dict(max_model_len=64, page_size=8, max_num_batched_tokens=16, max_num_seqs=4)
K = 3
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


MTP_TARGET = "deepseek_v3-noaux-yarn"
MTP_TARGETS = {"mtp": MTP_TARGET, "mtp-glm4_moe": "glm4_moe-grouped-sigmoid"}
# Its rotary covers 32 positions; 4 pages of 8 hold one sequence only (preemption).
MTP_SIZES = dict(SIZES, max_model_len=32, num_pages=4)


def repetitive_prompts(long: int = 40) -> list[list[int]]:
    """Prompts that repeat themselves (n-gram matches), one of `long` tokens, beyond the token budget (chunked)."""
    return [p + p[:4] + p for p in prompts((3, 6, 9))] + [prompts((long,), seed=1)[0]]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(TARGET)[0]


@pytest.fixture(scope="module")
def plain(folder):
    return LLM(folder, **SIZES)


@pytest.fixture(scope="module")
def speculative(folder):
    """One LLM per method: n-gram with the fewest pages allowed (preemption), and a draft that is a copy
    of the target (it drafts without penalties or top-k, so penalised and filtered requests still
    see rejections)."""
    return {
        "ngram": LLM(folder, speculative_config=NGRAM, **{**SIZES, "num_pages": 8}),
        "draft": LLM(folder, speculative_config={"method": "draft_model", "model": str(folder),
                                                 "num_speculative_tokens": K}, **SIZES),
    }


@pytest.fixture(scope="module")
def eagle3(folder, tmp_path_factory):
    """The target with a random EAGLE-3 head (aux layers 0, 1, 1 of its 2; 96 of its 128 ids), few pages."""
    import json

    head = tmp_path_factory.mktemp("eagle3")
    build_eagle3_checkpoint(head, json.loads((folder / "config.json").read_text()), draft_vocab=96, aux_layers=[0, 1, 1])
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": K}
    return LLM(folder, speculative_config=config, **{**SIZES, "num_pages": 8})


@pytest.fixture(scope="module")
def mtp_engines(tiny_checkpoint, tmp_path_factory):
    """`mtp_engines(target)` -> (plain, mtp) LLMs of a tiny target whose checkpoint carries a random MTP block
    (DeepSeek-V3's with its copies of the embeddings and head, GLM-4.5's without)."""
    built = {}

    def get(target: str) -> tuple[LLM, LLM]:
        if target not in built:
            folder = tmp_path_factory.mktemp("mtp") / "checkpoint"
            add_mtp_block(tiny_checkpoint(target)[0], folder, copies=target == MTP_TARGET)
            config = {"method": "mtp", "num_speculative_tokens": K}
            built[target] = LLM(folder, **MTP_SIZES), LLM(folder, speculative_config=config, **MTP_SIZES)
        return built[target]

    return get


def engines(request, method: str) -> tuple[LLM, LLM]:
    """(plain, speculative) LLMs of a method's row ("mtp" on DeepSeek-V3, "mtp-glm4_moe" on GLM-4.5)."""
    if method.startswith("mtp"):
        return request.getfixturevalue("mtp_engines")(MTP_TARGETS[method])
    plain = request.getfixturevalue("plain")
    if method == "eagle3":
        return plain, request.getfixturevalue("eagle3")
    return plain, request.getfixturevalue("speculative")[method]


def mixed_params(plain: LLM, prompt_ids: list[list[int]]) -> list[SamplingParams]:
    """Greedy requests with penalties, logprobs, a stop token, a stop string and short max_tokens."""
    free = plain.generate(token_prompts(prompt_ids[:2]), GREEDY)
    stop_token = free[0].outputs[0].token_ids[5]
    stop_text = free[1].outputs[0].text[6:8]
    return [
        dataclasses.replace(GREEDY, stop_token_ids=[stop_token], logprobs=2),
        dataclasses.replace(GREEDY, stop=[stop_text], repetition_penalty=1.3, frequency_penalty=0.4),
        dataclasses.replace(GREEDY, max_tokens=5, presence_penalty=0.5, logprobs=0),
        GREEDY,
    ]


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle3", "mtp", "mtp-glm4_moe"])
def test_greedy_outputs_match_plain_decoding(request, method):
    plain, llm = engines(request, method)
    prompt_ids = repetitive_prompts(20 if method.startswith("mtp") else 40)
    params = mixed_params(plain, prompt_ids)
    expected = plain.generate(token_prompts(prompt_ids), params)
    steps_before = llm.engine.spec.num_steps
    got = llm.generate(token_prompts(prompt_ids), params)
    for want, have in zip(expected, got):
        w, h = want.outputs[0], have.outputs[0]
        assert (h.token_ids, h.text, h.finish_reason, h.stop_reason) == (w.token_ids, w.text, w.finish_reason, w.stop_reason)
        if w.logprobs is not None:
            for a, b in zip(w.logprobs, h.logprobs):
                assert a.keys() == b.keys()
                np.testing.assert_allclose([x.logprob for x in b.values()], [x.logprob for x in a.values()], atol=1e-4)
                assert [x.rank for x in b.values()] == [x.rank for x in a.values()]
    stats = llm.engine.spec.stats
    assert stats.num_draft_tokens > 0 and llm.engine.pool.all_free()
    if method in ("ngram", "draft"):  # random heads: greedy drafts are (almost) never the target's argmax
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both outcomes exercised
    if method != "draft":
        assert llm.engine.scheduler.num_preemptions > 0
    if method not in ("ngram", "draft"):
        assert llm.engine.spec.proposer.pool.all_free()  # draft pages follow the sequences out
    assert llm.engine.spec.num_steps > steps_before


def test_a_copy_of_the_target_accepts_everything_in_k_plus_1_fewer_steps(speculative):
    llm = speculative["draft"]
    spec, max_tokens = llm.engine.spec, 13
    before = dataclasses.replace(spec.stats, accepted_per_pos=list(spec.stats.accepted_per_pos))
    steps = spec.num_steps
    out = llm.generate(token_prompts(prompts((6,), seed=5)), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == max_tokens
    # The prefill gives the first token; every later step verifies K drafts and adds one token of its own.
    assert spec.num_steps - steps == 1 + math.ceil((max_tokens - 1) / (K + 1))
    drafted = spec.stats.num_draft_tokens - before.num_draft_tokens
    assert spec.stats.num_accepted_tokens - before.num_accepted_tokens == drafted == max_tokens - 1 - 3  # all


@pytest.mark.parametrize("method", ["draft", "eagle3", "mtp"])
def test_sampled_distribution_is_unchanged(request, method):
    """Two-sample chi-square on the second token (the first that drafts decide), spec vs plain."""
    plain, spec = engines(request, method)
    prompt = prompts((5,), seed=7)[0]
    num = 400
    # max_tokens 3: the second token is the first a draft can decide (no drafting past max_tokens - 1).
    params = [SamplingParams(temperature=0.8, top_k=6, max_tokens=3, ignore_eos=True, seed=s) for s in range(num)]
    second = {}
    accepted = spec.engine.spec.stats.num_accepted_tokens
    for name, llm in (("plain", plain), ("spec", spec)):
        outputs = llm.generate(token_prompts([prompt] * num), params)
        second[name] = np.array([o.outputs[0].token_ids[1] for o in outputs])
    categories = np.unique(np.concatenate(list(second.values())))
    table = np.array([[np.sum(s == c) for c in categories] for s in second.values()])
    table = table[:, table.sum(0) >= 10]  # drop rare tokens (the test's expected counts stay >= 5)
    assert table.shape[1] >= 3 and chi2_contingency(table).pvalue > 1e-3
    assert spec.engine.spec.stats.num_accepted_tokens > accepted  # sampled drafts were accepted too


def test_seeded_sampling_is_reproducible_in_any_batch(speculative):
    llm = speculative["ngram"]
    prompt_ids = repetitive_prompts()
    seeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=11)
    alone = llm.generate(token_prompts(prompt_ids[:1]), seeded)[0].outputs[0].token_ids
    mixed = llm.generate(token_prompts(prompt_ids), [seeded, GREEDY, GREEDY, seeded])[0].outputs[0].token_ids
    assert alone == mixed


def test_bidirectional_spans_are_refused(speculative):
    """Drafts attend causally: a request with spans is refused by name, and the engine keeps serving."""
    llm = speculative["ngram"]
    with pytest.raises(ValueError, match="speculative decoding drafts causally"):
        llm.engine.add_request("spans", repetitive_prompts()[0], GREEDY, bidirectional_spans=[(0, 4)])
    assert not llm.engine.has_unfinished_requests()


def test_streamed_deltas_carry_several_tokens_per_step(speculative):
    llm = speculative["draft"]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    deltas = [o.outputs[0].token_ids for o in llm.stream({"prompt_token_ids": prompts((4,))[0]}, params)]
    final = llm.generate(token_prompts(prompts((4,))), dataclasses.replace(params, output_kind=RequestOutputKind.CUMULATIVE))
    assert sum(deltas, []) == final[0].outputs[0].token_ids and max(map(len, deltas)) == K + 1


@pytest.mark.parametrize("method", ["draft", "eagle3"])
def test_metrics_use_vllm_names(request, method):
    from serving.metrics import ServingMetrics

    llm = engines(request, method)[1]
    text = generate_latest(ServingMetrics(llm.engine, "tiny").registry).decode()
    stats = llm.engine.spec.stats
    assert f'jaxllm:spec_decode_num_drafts_total{{model_name="tiny"}} {float(stats.num_drafts)}' in text
    assert f'jaxllm:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {float(stats.num_accepted_tokens)}' in text
    assert 'jaxllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="2"}' in text
    assert "jaxllm:spec_decode_mean_acceptance_length" in text and "jaxllm:spec_decode_num_draft_tokens_total" in text


def test_a_draft_with_another_vocabulary_is_refused(folder, tmp_path):
    from tests.tiny_models import CASES_BY_NAME, build_checkpoint

    other = CASES_BY_NAME["llama-gqa"]
    case = dataclasses.replace(other, dims={**other.dims, "vocab_size": 96})
    build_checkpoint(case, tmp_path)
    with pytest.raises(ValueError, match=r"vocabulary size \(96\) differs from the target's \(128\)"):
        LLM(folder, speculative_config={"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2}, **SIZES)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(folder, speculative_config={"method": "draft_model", "model": str(tmp_path / "no"), "num_speculative_tokens": 2}, **SIZES)


# -- structured output: the grammar masks every verified position -----------------------------------------
REGEX = "[a-d]{4,8}(,[0-9]){0,2}!"
CHOICES = ["red", "green", "blue", "bad, dab"]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


def structured_batch() -> list[tuple[dict, SamplingParams]]:
    """Prompts that repeat text the grammars allow (n-gram drafts, some cut by the grammar), each
    constraint greedy, one drawn with a seed, and a free request in the same batch."""
    from serving.structured import StructuredOutputsParams

    def constrained(**kw) -> SamplingParams:
        temperature = kw.pop("temperature", 0.0)
        return SamplingParams(temperature=temperature, seed=5, max_tokens=30,
                              structured_outputs=StructuredOutputsParams(**kw))

    return [
        ({"prompt": "abca,1!abcab,2!abca,1!"}, constrained(regex=REGEX)),
        ({"prompt": "blue red green blue bad"}, constrained(choice=CHOICES)),
        ({"prompt": '{"n": 12, "ok": true}{"n": 12, "'}, constrained(json=SCHEMA)),
        ({"prompt_token_ids": repetitive_prompts()[0]}, GREEDY),
        ({"prompt": "dcba,9!dcba,9!dcb"}, constrained(regex=REGEX, temperature=1.0)),
    ]


def assert_keeps_to_its_grammar(text: str, params: SamplingParams) -> None:
    import json
    import re

    import jsonschema

    constraint = params.structured_outputs
    if constraint.regex is not None:
        assert re.fullmatch(REGEX, text), text
    elif constraint.choice is not None:
        assert text in CHOICES, text
    else:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_structured_outputs_match_plain_structured_decoding(plain, speculative, method):
    llm = speculative[method]
    batch = structured_batch()
    prompts_, params = [p for p, _ in batch], [s for _, s in batch]
    expected = plain.generate(prompts_, params)
    before = dataclasses.replace(llm.engine.spec.stats)
    got = llm.generate(prompts_, params)
    for want, have, p in zip(expected, got, params):
        w, h = want.outputs[0], have.outputs[0]
        if p.temperature == 0:  # drawn requests follow the same distribution, not the same draws
            assert (h.token_ids, h.text, h.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        if p.structured_outputs is not None:
            assert h.finish_reason == "stop"
            assert_keeps_to_its_grammar(h.text, p)
    stats = llm.engine.spec.stats
    drafted = stats.num_draft_tokens - before.num_draft_tokens
    assert 0 < stats.num_accepted_tokens - before.num_accepted_tokens < drafted
    assert llm.engine.pool.all_free()
