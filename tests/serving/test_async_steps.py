"""Asynchronous steps and start-up warm-up: tokens fed on the device, extra tokens of finished
sequences dropped, outputs as deltas, sampling state kept on the device, nothing compiled after
warm-up."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from jax import monitoring

from serving import LLM, RequestOutputKind, SamplingParams
from serving.engine.slot_state import PROMPT_BIT, count_row
from serving.structured import StructuredOutputsParams
from tests.serving.helpers import prompts

pytestmark = pytest.mark.xdist_group("async_steps")

CASE = "qwen3-qknorm"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint(CASE)
    return LLM(folder, max_model_len=48, page_size=4, max_num_batched_tokens=32, max_num_seqs=8)


def test_decode_inputs_come_from_the_device_and_reads_lag_one_step(llm, monkeypatch):
    engine = llm.engine
    prepared = []
    prepare = engine.runner.prepare
    monkeypatch.setattr(engine.runner, "prepare", lambda scheduled: prepared.append(prepare(scheduled)) or prepared[-1])
    engine.add_request("a", prompts((5,))[0], GREEDY)
    assert engine.step() == []  # the prefill is dispatched; nothing read yet
    seq = engine.requests["a"].sequences[0]
    assert seq.num_pending == 1 and seq.output_ids == [] and (prepared[0].feed == -1).all()
    first = engine.step()  # dispatches the first decode, then reads the prefill's token
    assert first[0].outputs[0].token_ids == seq.output_ids and len(seq.output_ids) == 1 and seq.num_pending == 1
    assert prepared[1].feed[0] == seq.slot and (prepared[1].feed[1:] == -1).all()  # not from the host
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].outputs[0].token_ids == llm.generate({"prompt_token_ids": prompts((5,))[0]}, GREEDY)[0].outputs[0].token_ids


def test_a_stop_token_drops_the_speculative_step_and_frees_its_pages(llm):
    prompt = prompts((9,), seed=3)[0]
    free = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
    stop = free[2]
    engine = llm.engine
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop]))
    seq = engine.requests["s"].sequences[0]
    finished = None
    while finished is None:
        finished = next((o for o in engine.step() if o.finished), None)
    # Step 4 (sampling the 4th token) was dispatched before the stop token was read: its token is dropped.
    assert finished.outputs[0].token_ids == free[: free.index(stop) + 1]
    assert engine._in_flight is not None and seq in [item.seq for item in engine._in_flight.scheduled]
    assert engine.pool.all_free() and seq.slot is None
    engine.step()  # reads the extra token and drops it
    assert finished.outputs[0].token_ids == free[: free.index(stop) + 1] and not engine.has_unfinished_requests()


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=10, n=2, logprobs=2, ignore_eos=True)
    whole = list(llm.stream("The cat sat on", params))[-1]
    delta_params = SamplingParams(**{**params.__dict__, "output_kind": RequestOutputKind.DELTA})
    deltas = list(llm.stream("The cat sat on", delta_params))
    for c in whole.outputs:
        parts = [o.outputs[c.index] for o in deltas]
        assert sum((p.token_ids for p in parts), []) == c.token_ids
        assert "".join(p.text for p in parts) == c.text
        entries = sum((p.logprobs for p in parts), [])
        assert [sorted(e) for e in entries] == [sorted(e) for e in c.logprobs]
        for got, want in zip(entries, c.logprobs):
            assert {t: lp.logprob for t, lp in got.items()} == pytest.approx({t: lp.logprob for t, lp in want.items()}, abs=1e-5)
    assert deltas[-1].finished and len(deltas) > 2


def test_logprobs_cost_nothing_unless_asked(llm):
    engine = llm.engine
    engine.add_request("g", [5, 6, 7], GREEDY)
    engine.step()
    assert engine._in_flight.sampled.logprobs is None and engine._in_flight.sampled.top_ids is None
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].outputs[0].cumulative_logprob is None


def test_penalty_counts_live_on_the_device(llm):
    """A penalised request's count row is written when it joins, then advanced by the sampler only."""
    engine = llm.engine
    prompt = [5, 6, 7, 5]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, frequency_penalty=1.5, repetition_penalty=1.3)
    engine.add_request("p", prompt, params)
    seq = engine.requests["p"].sequences[0]
    engine.step()
    slot = seq.slot
    while engine.has_unfinished_requests():
        out = engine.step()
    tokens = out[0].outputs[0].token_ids
    row = np.asarray(engine.slot_state.counts[slot])
    # Every token was counted on the device except the last one read (its step was the last dispatched).
    np.testing.assert_array_equal(row, count_row(prompt, tokens, len(row)))
    assert (row[prompt] & PROMPT_BIT).all()
    assert tokens == llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids


def test_nothing_compiles_after_warm_up(tiny_checkpoint, without_compilation_cache):
    folder, _ = tiny_checkpoint(CASE)
    # Layers scanned, as an accelerator serves them (the CPU default unrolls them).
    llm = LLM(folder, max_model_len=16, page_size=4, max_num_batched_tokens=8, max_num_seqs=4, enforce_eager=False,
              scan_layers=True)
    assert llm.engine.runner.scan_layers
    assert len(llm.engine.runner.compiled_shapes) == len(llm.engine.runner.step_shapes())
    compiled = []

    def listen(event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiled.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        workload = [
            ({"prompt_token_ids": prompts((11,))[0]}, SamplingParams(temperature=0, max_tokens=4)),
            ("The cat sat on", SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1, max_tokens=5, n=2)),
            ("Hello, world", SamplingParams(temperature=0, logprobs=3, max_tokens=6, stop=["o"])),
            ("A prompt", SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.5, max_tokens=8)),
            ("The cat sat on", SamplingParams(temperature=0, repetition_penalty=1.2, max_tokens=3)),
            ("A prompt", SamplingParams(temperature=0.5, max_tokens=4,
                                        structured_outputs=StructuredOutputsParams(regex="[a-c]+"))),
        ]
        outputs = llm.generate([p for p, _ in workload], [s for _, s in workload])
        outputs += list(llm.stream("Hello", SamplingParams(temperature=0, max_tokens=3)))
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listen)  # noqa: SLF001
    assert all(o.finished for o in outputs[:6]) and llm.engine.pool.all_free()
    assert compiled == [], f"{len(compiled)} compilations after warm-up"


def test_engine_host_benchmark_dry_run():
    from benchmarks.engine_host import main

    result = main(["--dry-run"])
    assert set(result["host_ms"]) == {1, 4} and all(ms > 0 for ms in result["host_ms"].values())
    assert all(ms > 0 for ms in result["host_cpu_ms"].values())
    if shutil.which("c++") is None:
        assert "C++ compiler" in result["idle"]["error"]
        return
    idle = result["idle"]
    assert 0 <= idle["host_wait"] <= idle["idle_fraction"] < 1 and idle["step_ms"] >= idle["device_ms"]
    assert 0 <= idle["device_idle"] < 1


def test_the_startup_heap_is_frozen_out_of_full_collections_and_can_be_given_back():
    import gc

    from serving.engine.gc_heap import freeze_startup_heap

    alive = {"model": [1, 2, 3]}  # a tracked container alive at start-up
    try:
        assert freeze_startup_heap() == gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects(generation=2))  # a full collection no longer scans it
    finally:
        gc.unfreeze()  # this test process collects as before
    assert any(o is alive for o in gc.get_objects(generation=2))


def test_device_idle_is_the_time_no_xla_thread_ran_within_the_timed_stub_calls():
    from benchmarks.engine_host import busy_union

    def event(tid, ts, dur, name="fusion"):
        return {"ph": "X", "tid": tid, "ts": ts, "dur": dur, "name": name}

    names = [{"ph": "M", "name": "thread_name", "tid": t, "args": {"name": n}}
             for t, n in ((1, "python"), (2, "tf_XLAPjRtCpuClient/1"), (3, "tf_XLAEigen/2"))]
    stub = [event(2, 100 * i, 50, "ffi_call.1") for i in range(6)]  # steps 4 and 5 are timed: 400-550
    work = [event(3, 440, 30), event(2, 460, 20), event(3, 470, 5),  # overlapping: 440-480 busy
            event(1, 480, 20),  # the Python thread's events are the host's, not the device's
            event(2, 520, 100)]  # ends past the span: clipped at 550
    span, busy = busy_union(names + stub + work, steps=2)
    assert (span, busy) == (150, (480 - 400) + (550 - 500))


# -- structured output: each grammar's mask needs its sequence's previous token on the host ----------------
REGEX = "[a-d]{3,6}(,[0-9]{1,2})*!"


def regex_params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=24, structured_outputs=StructuredOutputsParams(regex=REGEX), **kw)


def test_grammar_steps_read_the_pending_token_first_and_free_rows_stay_free(llm):
    import re

    engine = llm.engine
    free_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts((7,))[0]}, free_params)[0].outputs[0].token_ids
    engine.add_request("free", prompts((7,))[0], free_params)
    engine.add_request("json", prompts((5,))[0], regex_params(temperature=1.0, seed=3, n=2))
    constrained = engine.requests["json"].sequences
    outputs = {}
    while engine.has_unfinished_requests():
        scheduled_with_pending = any(s.num_pending for s in constrained) and engine._in_flight is not None
        for out in engine.step():
            outputs[out.request_id] = out
        # A step that samples a constrained sequence never leaves its previous token unread.
        assert not (scheduled_with_pending and any(s.num_pending > 1 for s in constrained))
    assert outputs["free"].outputs[0].token_ids == alone  # a batch with grammars leaves free rows alone
    texts = [c.text for c in outputs["json"].outputs]
    assert all(re.fullmatch(REGEX, t) for t in texts) and texts[0] != texts[1], texts
    assert engine.pool.all_free()


def test_grammar_survives_preemption_and_abort(llm):
    import re

    engine = llm.engine
    fixed = "[a-d]{12}"  # every answer is 12 characters (12 tokens: the multi-character pieces hold no a-d pairs)
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=11,
                            structured_outputs=StructuredOutputsParams(regex=fixed))
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts((9, 6))], params)]
    pages_per_seq = -(-(9 + 13) // engine.config.page_size)
    held = engine.pool.allocate(engine.pool.num_free() - pages_per_seq - 1)  # room for one sequence and a bit
    before = engine.scheduler.num_preemptions
    try:
        got = llm.generate([{"prompt_token_ids": p} for p in prompts((9, 6))], params)
    finally:
        engine.pool.release(held)
    assert engine.scheduler.num_preemptions > before
    assert [o.outputs[0].token_ids for o in got] == want  # the matcher kept its state through the recompute
    assert all(re.fullmatch(fixed, o.outputs[0].text) for o in got)
    engine.add_request("gone", prompts((5,))[0], regex_params(temperature=1.0, n=3))
    engine.step()
    engine.step()
    engine.abort_request("gone")
    while engine.has_unfinished_requests() or engine._in_flight is not None:
        engine.step()
    assert engine.pool.all_free()


# -- memory mappings: each compiled shape holds some, and a process has a fixed number ---------------------------
def test_a_new_shape_near_the_map_limit_drops_compiled_programs_and_serves_the_same(llm, monkeypatch, caplog):
    from serving.engine import executables

    prompt = {"prompt_token_ids": prompts((7,))[0]}
    expected = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    runner = llm.engine.runner
    monkeypatch.setattr(executables, "map_limit", lambda: 1)  # every mapping is over the budget
    runner.compiled_shapes.clear()  # (earlier tests compiled them): the next steps' shapes count as new
    with caplog.at_level("WARNING", logger=executables.__name__):
        outputs = llm.generate([prompt] * 3, GREEDY)
    assert "dropped JAX's compiled programs" in caplog.text
    assert [o.outputs[0].token_ids for o in outputs] == [expected] * 3
    # Each new shape released everything compiled before it, so the runner lists only what compiled since.
    assert 1 <= len(runner.compiled_shapes) <= 2


def test_warm_up_stops_before_the_map_budget_and_the_rest_compile_on_demand(tiny_checkpoint, monkeypatch, caplog):
    from serving.engine import executables

    folder, _ = tiny_checkpoint(CASE)
    # A budget of the mappings held when warm-up starts and nothing more: the first shape compiles (its cost is
    # not known before it), the second would pass the budget.
    held = []

    def limit() -> int:
        held[:] = held or [executables.memory_maps()]
        return int(held[0] / executables.MAP_BUDGET) + 1

    monkeypatch.setattr(executables, "map_limit", limit)
    with caplog.at_level("WARNING"):
        llm = LLM(folder, max_model_len=48, page_size=4, max_num_batched_tokens=32, max_num_seqs=8,
                  enforce_eager=False)
    runner = llm.engine.runner
    assert f"warm-up stopped after 1 of {len(runner.step_shapes())} step shapes" in caplog.text
    monkeypatch.undo()
    out = llm.generate({"prompt_token_ids": prompts((20,))[0]}, GREEDY)[0].outputs[0].token_ids  # a 32-token step
    assert len(out) == GREEDY.max_tokens and len(runner.compiled_shapes) > 1
