"""The jitted sampler against numpy references on fixed logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine.sampler import NO_TOKEN, SamplingBatch, apply_penalties, filter_logits, sample

LOGITS = np.array(
    [
        [2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        [5.0, 4.1, 0.0, -3.0, 1.0, 2.2, -0.5, 3.3],
        [-1.0, -1.2, -0.7, -3.0, -0.1, -2.5, -1.9, -0.4],
    ],
    np.float32,
)


def softmax(x):
    e = np.exp(x - np.max(x[np.isfinite(x)]))
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def numpy_filter(logits, top_k, top_p, min_p):
    out = logits.astype(np.float64).copy()
    if top_k > 0:
        out[logits < np.sort(logits)[::-1][min(top_k, len(logits)) - 1]] = -np.inf
    probs, kept, mass = softmax(out), [], 0.0
    for i in np.argsort(-out):
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    out[[i for i in range(len(out)) if i not in kept]] = -np.inf
    probs = softmax(out)
    out[probs < min_p * probs.max()] = -np.inf
    return out


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (4, 0.8, 0.05), (1, 0.3, 0.0), (6, 0.95, 0.3),
     (0, 0.0, 0.0), (2**31 - 1, 1.0, 0.0)],  # a top_p that underflowed float32 keeps the top token; top_k past V is off
)
def test_filters_match_numpy(top_k, top_p, min_p):
    rows = len(LOGITS)
    got = np.asarray(
        filter_logits(
            jnp.asarray(LOGITS),
            jnp.full(rows, top_k, jnp.int32),
            jnp.full(rows, top_p, jnp.float32),
            jnp.full(rows, min_p, jnp.float32),
        )
    )
    for row in range(rows):
        expected = numpy_filter(LOGITS[row], top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(expected), err_msg=f"row {row}")
        np.testing.assert_allclose(got[row][np.isfinite(got[row])], expected[np.isfinite(expected)], rtol=1e-6)


def test_per_row_settings_mix_in_one_batch():
    settings = [(2, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.5), (5, 0.9, 0.1)]
    top_k, top_p, min_p = (jnp.asarray(col) for col in zip(*settings))
    got = np.asarray(filter_logits(jnp.asarray(LOGITS), top_k.astype(jnp.int32), top_p.astype(jnp.float32), min_p.astype(jnp.float32)))
    for row, (k, p, m) in enumerate(settings):
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(numpy_filter(LOGITS[row], k, p, m)))


def _batch(rows, **overrides):
    base = dict(
        temperature=np.ones(rows, np.float32),
        top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32),
        presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32),
        seeds=np.arange(rows, dtype=np.uint32),
        steps=np.zeros(rows, np.int32),
        prompt_ids=None,
        output_ids=None,
    )
    base.update(overrides)
    return SamplingBatch(**base)


def test_penalties_match_numpy():
    prompt = np.array([[0, 4, NO_TOKEN], [7, NO_TOKEN, NO_TOKEN], [NO_TOKEN] * 3, [1, 1, 2]], np.int32)
    output = np.array([[4, 4, 5, NO_TOKEN], [7, 7, 7, 3], [2, NO_TOKEN, NO_TOKEN, NO_TOKEN], [NO_TOKEN] * 4], np.int32)
    rep, pres, freq = np.array([1.3, 1.0, 2.0, 0.8]), np.array([0.5, 0.0, -0.4, 1.0]), np.array([0.2, 0.7, 0.0, 0.3])
    batch = _batch(4, repetition_penalty=rep.astype(np.float32), presence_penalty=pres.astype(np.float32),
                   frequency_penalty=freq.astype(np.float32), prompt_ids=prompt, output_ids=output)
    got = np.asarray(apply_penalties(jnp.asarray(LOGITS), batch))
    for r in range(4):
        expected = LOGITS[r].astype(np.float64).copy()
        counts = np.bincount(output[r][output[r] >= 0], minlength=8)
        seen = (counts > 0) | (np.bincount(prompt[r][prompt[r] >= 0], minlength=8) > 0)
        expected[seen] = np.where(expected[seen] > 0, expected[seen] / rep[r], expected[seen] * rep[r])
        expected -= freq[r] * counts + pres[r] * (counts > 0)
        np.testing.assert_allclose(got[r], expected, rtol=1e-5, atol=1e-6)


def test_draws_follow_the_filtered_distribution():
    rows = 4000
    logits = np.tile(LOGITS[2], (rows, 1))
    batch = _batch(rows, temperature=np.full(rows, 0.7, np.float32), top_k=np.full(rows, 5, np.int32),
                   seeds=np.full(rows, 123, np.uint32), steps=np.arange(rows, dtype=np.int32))
    tokens = np.asarray(sample(jnp.asarray(logits), batch, num_logprobs=0, use_penalties=False).tokens)
    expected = softmax(numpy_filter(LOGITS[2] / 0.7, 5, 1.0, 0.0))
    freq = np.bincount(tokens, minlength=8) / rows
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_seeds_reproduce_and_greedy_ignores_them():
    batch = _batch(4, seeds=np.array([7, 7, 8, 7], np.uint32), steps=np.array([3, 3, 3, 4], np.int32))
    logits = jnp.asarray(np.tile(LOGITS[1], (4, 1)) * 3)
    first = np.asarray(sample(logits, batch, num_logprobs=0, use_penalties=False).tokens)
    again = np.asarray(sample(logits, batch, num_logprobs=0, use_penalties=False).tokens)
    np.testing.assert_array_equal(first, again)
    greedy = batch.replace(temperature=np.zeros(4, np.float32))
    assert (np.asarray(sample(logits, greedy, num_logprobs=0, use_penalties=False).tokens) == 7).all()


def test_logprobs_ranks_and_top_n():
    batch = _batch(4, temperature=np.zeros(4, np.float32))
    out = sample(jnp.asarray(LOGITS), batch, num_logprobs=3, use_penalties=False)
    log_softmax = LOGITS - np.log(np.exp(LOGITS).sum(-1, keepdims=True))
    np.testing.assert_array_equal(out.tokens, LOGITS.argmax(-1))
    np.testing.assert_allclose(out.logprobs, log_softmax.max(-1), rtol=1e-6)
    np.testing.assert_array_equal(out.ranks, 1)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-LOGITS, -1)[:, :3])
    np.testing.assert_allclose(out.top_logprobs, np.sort(log_softmax, -1)[:, ::-1][:, :3], rtol=1e-6)
