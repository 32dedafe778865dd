"""Bounds on every parameter, the engine's request limits, and faults that stay with their request.

Offline (`SamplingParams`, `LLM`, `LLMEngine`, `AsyncLLMEngine`); the server's side is
tests/serving/test_server_faults.py.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from serving import LLM, SamplingParams
from serving.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from serving.engine.kv_pages import PagePool
from serving.engine.limits import RequestLimits
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence
from tests.serving.helpers import prompts

# Module-scoped fixtures: keep this file on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("request_limits")

CASE = "qwen3-qknorm"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LIMITS = RequestLimits(max_n=4, max_logprobs=5, max_stop=2, max_stop_len=8)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n=0), r"n must be in \[1, 2147483647\]"),
        (dict(n=1.5), "n must be an integer"),
        (dict(n=True), "n must be an integer"),
        (dict(temperature=-1), r"temperature must be in \[0, 100\]"),
        (dict(temperature=math.nan), "temperature must be in"),
        (dict(temperature=math.inf), "temperature must be in"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), r"top_k must be in \[-1, 2147483647\]"),
        (dict(top_k=2**31), r"top_k must be in \[-1, 2147483647\]"),
        (dict(min_p=-0.1), "min_p must be in"),
        (dict(repetition_penalty=5e-324), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(seed=2**63), "seed must be in"),
        (dict(seed=-(2**63) - 1), "seed must be in"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(max_tokens=0), r"max_tokens must be in \[1, 2147483647\]"),
        (dict(max_tokens=2**31), "max_tokens must be in"),
        (dict(logprobs=-1), "logprobs must be in"),
        (dict(stop=[1]), "stop must be a string or a list of strings"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be integers"),
        (dict(stop_token_ids=[2**31]), "stop_token_ids must be integers"),
    ],
)
def test_every_numeric_parameter_is_bounded(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_edge_values_that_are_accepted():
    assert SamplingParams(top_k=-1).top_k == 0  # -1 disables, as 0
    assert SamplingParams(temperature=1e-9).temperature == 1e-2  # tiny positive temperatures are raised
    SamplingParams(seed=-1), SamplingParams(seed=2**63 - 1), SamplingParams(top_k=2**31 - 1), SamplingParams(temperature=100)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint(CASE)
    return LLM(folder, max_model_len=40, page_size=4, max_num_batched_tokens=64, limits=LIMITS)


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ({"prompt_token_ids": [5] * 40}, GREEDY, "prompt is 40 tokens; max_model_len is 40"),
        ({"prompt_token_ids": [5, 500]}, GREEDY, r"prompt token ids must be integers in \[0, 128\)"),
        ({"prompt_token_ids": [5, 1.5]}, GREEDY, "prompt token ids must be integers"),
        ({"prompt_token_ids": []}, GREEDY, "the prompt is empty"),
        ("a lone \ud800 surrogate", GREEDY, "lone UTF-16 surrogate"),
        ({"prompt_token_ids": [5, 6]}, SamplingParams(n=5), r"n is 5; at most 4 completions per request \(max_n\)"),
        ({"prompt_token_ids": [5, 6]}, SamplingParams(logprobs=6), r"at most 5 \(max_logprobs\)"),
        ({"prompt_token_ids": [5, 6]}, SamplingParams(stop=["a", "b", "c"]), r"3 stop strings; at most 2 \(max_stop\)"),
        ({"prompt_token_ids": [5, 6]}, SamplingParams(stop=["x" * 9]), r"longer than 8 characters \(max_stop_len\)"),
        ({"prompt_token_ids": [5, 6]}, SamplingParams(stop_token_ids=[1, 2, 3]), r"3 stop token ids; at most 2"),
    ],
)
def test_the_engine_refuses_what_its_limits_rule_out(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished_requests() and llm.engine.pool.all_free()


def test_numpy_token_ids_and_huge_top_k_and_negative_seeds_are_served(llm):
    ids = np.asarray(prompts((7,))[0], np.int64)
    greedy = llm.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].token_ids
    # top_k beyond the vocabulary disables the filter; temperature 0 stays greedy.
    wide = SamplingParams(temperature=0, top_k=2**31 - 1, max_tokens=6, ignore_eos=True)
    assert llm.generate({"prompt_token_ids": list(ids)}, wide)[0].outputs[0].token_ids == greedy
    seeded = SamplingParams(temperature=1.0, seed=-1, max_tokens=6, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": list(ids)}, seeded)[0].outputs[0].token_ids
    assert llm.generate({"prompt_token_ids": list(ids)}, seeded)[0].outputs[0].token_ids == first


def test_max_model_len_beyond_the_positions_needs_the_override(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama-dynamic")  # 8 positions, dynamic rope factor 2: 16
    with pytest.raises(ValueError, match="longer than the model's 16 positions; pass allow_long_max_model_len"):
        LLM(folder, max_model_len=24, page_size=4, num_pages=8)
    assert LLM(folder, max_model_len=24, page_size=4, num_pages=8, allow_long_max_model_len=True).engine.max_model_len == 24


def _run_all(engine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_a_fault_in_one_request_fails_only_that_request(llm):
    engine = llm.engine
    prompt_ids = prompts((5, 9, 13, 17), seed=4)
    solo = [llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids for p in prompt_ids]
    for i, p in enumerate(prompt_ids):
        engine.add_request(f"r{i}", p, GREEDY)

    def broken_detokenizer(token: int) -> str:
        raise RuntimeError("detokenizer exploded")

    engine.requests["r1"].detokenizers[0].add = broken_detokenizer  # fails while appending its first token
    engine.requests["r2"].sequences[0].seed = 2**40  # a row the sampling batch cannot hold: fails while preparing
    finished = _run_all(engine)
    assert "detokenizing" in finished["r1"].error and "detokenizer exploded" in finished["r1"].error
    assert "preparing" in finished["r2"].error and finished["r2"].outputs[0].finish_reason == "error"
    assert [finished[f"r{i}"].outputs[0].token_ids for i in (0, 3)] == [solo[0], solo[3]]
    assert finished["r0"].error is None and engine.pool.all_free()
    assert llm.generate({"prompt_token_ids": prompt_ids[1]}, GREEDY)[0].outputs[0].token_ids == solo[1]


def test_a_device_failure_stops_the_async_engine_and_says_why(llm, monkeypatch):
    died = []
    engine = AsyncLLMEngine(llm.engine, on_death=died.append)
    engine.start()

    async def one(request_id: str, params: SamplingParams):
        return [out async for out in engine.generate(request_id, [5, 6, 7], params)][-1]

    async def scenario():
        assert (await one("ok", GREEDY)).finished
        with pytest.raises(ValueError, match="max_n"):
            await one("too-many", SamplingParams(n=5))
        monkeypatch.setattr(llm.engine.runner, "run", lambda inputs: (_ for _ in ()).throw(RuntimeError("XLA: device lost")))
        with pytest.raises(EngineDeadError, match="device lost"):
            await one("dead", GREEDY)

    try:
        asyncio.run(scenario())
        engine._thread.join(10)
        assert not engine.alive and "device lost" in repr(engine.error) and len(died) == 1
    finally:
        engine.shutdown()
    monkeypatch.undo()
    assert llm.engine.pool.all_free() and not llm.engine.has_unfinished_requests()


def test_a_request_the_engine_fails_raises_in_its_caller_only(llm):
    engine = AsyncLLMEngine(llm.engine)
    engine.start()

    async def scenario():
        async def collect(request_id):
            return [out async for out in engine.generate(request_id, [5, 6, 7, 8], GREEDY)][-1]

        good = asyncio.create_task(collect("good"))
        bad_params = SamplingParams(temperature=0, max_tokens=6)
        bad_params.top_k = 2**40  # slipped past validation: its sampling row overflows
        with pytest.raises(RequestFailedError, match="preparing"):
            await collect_bad(bad_params)
        return await good

    async def collect_bad(params):
        return [out async for out in engine.generate("bad", [5, 6, 7], params)][-1]

    try:
        assert asyncio.run(scenario()).outputs[0].finish_reason == "length"
        assert engine.alive
    finally:
        engine.shutdown()


def test_aborting_many_waiting_sequences_is_linear():
    pool = PagePool(64, 4)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(i, "r", i, [1, 2, 3], GREEDY, 0, 4) for i in range(30_000)]
    for seq in seqs:
        scheduler.add(seq)
    start = time.perf_counter()
    for seq in seqs:
        scheduler.finish(seq, "abort")
    assert time.perf_counter() - start < 2.0  # O(n^2) list removal takes minutes here
    assert scheduler.num_waiting == 0 and not scheduler.has_work() and not scheduler.schedule()
