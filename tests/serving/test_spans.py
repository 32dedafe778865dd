"""Bidirectional spans in the engine: chunking, prefix caching, and logits equal to the dense forward."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.spans import visible_until_from_spans
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.kv_pages import PagePool
from serving.engine.limits import RequestLimits
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence
from serving.engine.spans import check_spans, computed_prefix_end, span_cut
from serving.sampling_params import SamplingParams
from tests.serving.helpers import prompts
from tests.tiny_models import VOCAB

pytestmark = pytest.mark.xdist_group("engine")

CASE = "llama-gqa"
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=VOCAB)


def test_span_helpers():
    assert check_spans([(9, 12), [2, 5]], 12, 8) == ((2, 5), (9, 12))
    for bad, match in [([(3, 3)], "not a non-empty range"), ([(0, 13)], "not a non-empty range"),
                       ([(0, 9)], "9 tokens, more than one step takes"), ([(0, 4), (3, 6)], "overlap"),
                       ([(1,)], "a .start, end. pair")]:
        with pytest.raises(ValueError, match=match):
            check_spans(bad, 12, 8)
    spans = ((4, 12), (14, 16))
    assert span_cut(spans, 0, 8) == 4  # stops before the span it would split
    assert span_cut(spans, 4, 7) == 0  # the span starts the chunk and does not fit
    assert span_cut(spans, 4, 8) == 8 and span_cut(spans, 12, 3) == 2 and span_cut(spans, 0, 3) == 3
    assert [computed_prefix_end(spans, n) for n in (0, 4, 8, 12, 15, 16)] == [0, 4, 4, 12, 14, 16]


def make_seq(seq_id: int, prompt: list[int], spans=()) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(prompt), PARAMS, 0, 4, spans=tuple(spans))


def run_schedule(scheduler: Scheduler, steps: int) -> list[dict[int, tuple[int, int]]]:
    """Schedule `steps` steps (each finished prompt samples token 7); per step: seq id -> its chunk."""
    chunks = []
    for _ in range(steps):
        scheduled = scheduler.schedule()
        chunks.append({it.seq.seq_id: (it.seq.num_computed, it.seq.num_computed + it.num_new_tokens)
                       for it in scheduled})
        complete = [item.seq for item in scheduled if item.completes_sequence]
        scheduler.update_after_step(scheduled)
        for seq in complete:
            seq.output_ids.append(7)
    return chunks


def test_scheduler_never_splits_a_span_and_a_held_back_span_goes_first():
    scheduler = Scheduler(PagePool(64, 4), max_num_seqs=4, max_num_batched_tokens=8)
    decoding, spanned = make_seq(0, prompts((3,))[0]), make_seq(1, prompts((20,))[0], [(4, 12), (13, 16)])
    scheduler.add(decoding)
    scheduler.add(spanned)
    chunks = run_schedule(scheduler, 6)
    # Step 1: 3 + 5 tokens would split (4, 12): stop at 4. Step 2: 7 tokens left, the span needs 8: held back.
    # Step 3: it goes first with the whole budget (the decode waits). Then (13, 16) fits whole.
    assert [c.get(1) for c in chunks] == [(0, 4), None, (4, 12), (12, 19), (19, 20), (20, 21)]
    assert [c.get(0) for c in chunks] == [(0, 3), (3, 4), None, (4, 5), (5, 6), None]  # None: max_tokens reached


def test_a_prefix_hit_inside_a_span_is_cut_back_and_span_pages_are_keyed_by_their_spans():
    pool = PagePool(64, 4)
    scheduler = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = prompts((20,))[0]
    first = make_seq(0, prompt, [(10, 18)])
    scheduler.add(first)
    run_schedule(scheduler, 2)  # its 5 pages are full and registered
    same, other_spans, plain = make_seq(1, prompt, [(10, 18)]), make_seq(2, prompt, [(2, 5)]), make_seq(3, prompt)
    for seq in (same, other_spans, plain):
        scheduler.add(seq)
    chunks = run_schedule(scheduler, 1)[0]
    # 4 cached pages (16 tokens) end inside (10, 18): back to page 2 (token 8), the span's page.
    assert chunks[1] == (8, 20)
    assert chunks[2] == (0, 20), "page 0 holds another span: nothing of the prompt is shared"
    assert chunks[3] == (8, 20), "a plain prompt shares the two pages before the span only"


@nnx.jit
def dense_logits(model, ids, mask, visible_until):
    return model(ids, mask, visible_until=visible_until)


def dense_reference(model, rows: list[tuple[list[int], tuple]]) -> list[np.ndarray]:
    """Per row (token ids, prompt spans): log-softmax of the dense forward with those spans, right-padded to one
    shape so that one program serves every row."""
    length = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    visible = np.tile(np.arange(length, dtype=np.int32), (len(rows), 1))
    for r, (tokens, spans) in enumerate(rows):
        ids[r, : len(tokens)], mask[r, : len(tokens)] = tokens, 1
        visible[r] = visible_until_from_spans(spans, visible[r])
    logits = dense_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(visible))
    logprobs = np.asarray(jax_log_softmax(logits))
    return [logprobs[r, : len(tokens)] for r, (tokens, _) in enumerate(rows)]


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x, axis=-1)


def serve(engine: LLMEngine, requests: list[tuple[list[int], tuple]]) -> list:
    """Run requests (prompt, spans) to the end; their completions in order."""
    for i, (prompt, spans) in enumerate(requests):
        engine.add_request(f"r{len(engine.requests)}-{i}", prompt, PARAMS, bidirectional_spans=spans)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[k] for k in sorted(done, key=lambda k: int(k.split("-")[1]))]


def assert_engine_matches_dense(model, requests, completions, min_span_effect: float = 1e-2) -> None:
    """Each completion's full-vocabulary logprobs equal the dense forward's over prompt + output with the prompt's
    spans, and (for requests with spans) differ from the causal forward's: ignoring spans fails."""
    rows = [(prompt + c.token_ids, spans) for (prompt, spans), c in zip(requests, completions)]
    with_spans = dense_reference(model, rows)
    causal = dense_reference(model, [(tokens, ()) for tokens, _ in rows])
    for (prompt, spans), c, want, plain in zip(requests, completions, with_spans, causal):
        got = np.array([[step[t].logprob for t in range(VOCAB)] for step in c.logprobs])
        expected = want[len(prompt) - 1 : len(prompt) - 1 + len(c.token_ids)]
        np.testing.assert_allclose(got, expected, atol=2e-4)
        assert c.token_ids == list(expected.argmax(-1))
        if spans:
            effect = np.abs(expected - plain[len(prompt) - 1 : len(prompt) - 1 + len(c.token_ids)]).max()
            assert effect > min_span_effect, f"the spans {spans} must change the logits"


def engine_for(model, **overrides) -> LLMEngine:
    # One token bucket (16) and page tables of 8 or 12 pages: few programs to compile.
    config = EngineConfig(page_size=4, max_num_batched_tokens=16, max_model_len=48, max_num_seqs=4, min_token_bucket=16,
                          limits=RequestLimits(max_logprobs=VOCAB), enforce_eager=True, **overrides)
    return LLMEngine(model, None, config)


def test_request_spans_give_the_dense_forwards_logits(tiny_checkpoint):
    """Chunked prefill (16 tokens a step) with a span crossing the chunk boundary, a plain prompt beside it, then
    prefix-cache hits with the same and with other spans; every logprob equals the dense forward's."""
    folder, _ = tiny_checkpoint(CASE)
    model = model_lib.from_pretrained(folder)
    engine = engine_for(model)
    long_prompt, short_prompt = prompts((30, 9), seed=4)
    # Chunks of the long prompt: [0, 13) (stops before (13, 20)), [13, 22) (before (22, 30)), [22, 30).
    spans = ((3, 9), (13, 20), (22, 30))
    first = [(long_prompt, spans), (short_prompt, ())]
    completions = serve(engine, first)
    assert {v[3:] for v in engine.runner.compiled_shapes} >= {("spans",), ()}, "spans only where a token is in one"
    hits = engine.pool.prefix_hits
    again = [(long_prompt, spans), (long_prompt, ((5, 12),)), (short_prompt, ())]
    completions += serve(engine, again)
    # The same spans: 7 cached pages end inside (22, 30), cut back to its page (20 tokens); other spans: page 0
    # differs; the plain prompt: its 2 full pages.
    assert engine.pool.prefix_hits - hits == 20 + 0 + 8
    assert_engine_matches_dense(model, first + again, completions)
    assert engine.pool.all_free()
    with pytest.raises(ValueError, match="more than one step takes"):
        engine.add_request("long", long_prompt, PARAMS, bidirectional_spans=[(0, 17)])


def test_a_model_that_declares_spans_passes_visible_until_on_every_step(tiny_checkpoint):
    folder, _ = tiny_checkpoint(CASE)
    model = model_lib.from_pretrained(folder)
    model.config = dataclasses.replace(model.config, bidirectional_spans=True)
    engine = engine_for(model, enable_prefix_caching=False, scan_layers=True)  # the stacked pools carry the spans too
    assert engine.runner.scan_layers
    requests = [(p, s) for p, s in zip(prompts((14, 5), seed=5), (((2, 11),), ()))]
    completions = serve(engine, requests)
    assert engine.runner.compiled_shapes and all(v[3:] == ("spans",) for v in engine.runner.compiled_shapes)
    assert_engine_matches_dense(model, requests, completions)
