"""Speculative decoding's parts on their own: config validation, n-gram lookup, and the verifier's
rejection sampling (chi-square against the target distribution; exact greedy)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from serving.engine.sampler import batch_from_rows, sampling_row
from serving.engine.slot_state import new_slot_state, write_rows
from serving.spec_decode import SpeculativeConfig
from serving.spec_decode.ngram import lookup
from serving.spec_decode.verify import verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


@pytest.mark.parametrize("value, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 17}, r"\[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({**NGRAM, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, r"prompt_lookup_min \(4\) exceeds"),
    ({**NGRAM, "prompt_lookup_max": 65}, r"prompt_lookup_max must be an integer in \[1, 64\]"),
    ({**NGRAM, "model": "x"}, "takes no draft 'model'"),
    ({**NGRAM, "draft_tensor_parallel_size": 1}, "unknown speculative config keys"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "d", "prompt_lookup_max": 3}, "ngram method only"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_speculative_configs_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_prompt_lookup_bounds_default_as_vllm():
    assert (SpeculativeConfig.parse(NGRAM).prompt_lookup_min, SpeculativeConfig.parse(NGRAM).prompt_lookup_max) == (5, 5)
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (3, 3)


def test_lookup_takes_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], np.int32)
    assert lookup(tokens, 1, 3, 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5" ("5 2 3" never)
    assert lookup(tokens, 3, 3, 3) == []  # no earlier "5 2 3"
    assert lookup(np.array([4, 4], np.int32), 1, 2, 5) == [4]  # the continuation runs into the suffix
    assert lookup(np.array([6], np.int32), 1, 2, 2) == []


TARGET = np.log(np.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.3, 0.1, 0.2, 0.15, 0.25], [0.6, 0.1, 0.1, 0.1, 0.1]]))
DRAFT = np.array([[0.5, 0.1, 0.1, 0.2, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1]])
NUM_SEQS = 4096


def run_verify(drafts: np.ndarray, draft_probs: np.ndarray | None, temperature: float = 1.0):
    """Every row the same target logits (TARGET at positions 0..K), its own seed."""
    num_k = drafts.shape[1]
    vocab = TARGET.shape[1]
    state = new_slot_state(NUM_SEQS, vocab, 64)
    rows = [sampling_row(temperature, 0, 1.0, 0.0, 1.0, 0.0, 0.0, seed, 0) for seed in range(NUM_SEQS)]
    state = write_rows(state, np.arange(NUM_SEQS, dtype=np.int32), batch_from_rows(rows, NUM_SEQS, None, None))
    logits = np.tile(TARGET[: num_k + 1], (NUM_SEQS, 1)).astype(np.float32)
    out, accepted, _, _ = verify(
        jnp.asarray(logits), state, jnp.zeros(NUM_SEQS, jnp.int32), np.arange(NUM_SEQS, dtype=np.int32),
        np.ones(NUM_SEQS, bool), drafts.astype(np.int32), np.full(NUM_SEQS, num_k, np.int32),
        None if draft_probs is None else jnp.asarray(draft_probs, jnp.float32), np.arange(NUM_SEQS, dtype=np.int32),
        num_logprobs=None, use_penalties=False,
    )
    return np.asarray(out.tokens).reshape(NUM_SEQS, num_k + 1), np.asarray(accepted)


def assert_distributed_as(samples: np.ndarray, probs: np.ndarray) -> None:
    counts = np.bincount(samples, minlength=probs.shape[0])
    assert chisquare(counts, probs * counts.sum()).pvalue > 1e-3, (counts, probs * counts.sum())


@pytest.mark.parametrize("method", ["point_mass", "draft_probs"])
def test_rejection_sampling_keeps_the_target_distribution(method):
    rng = np.random.default_rng(0)
    if method == "point_mass":  # n-gram: the same drafts for every row, q = 1 on them
        drafts, probs = np.tile([[2, 1]], (NUM_SEQS, 1)), None
    else:  # drafts drawn from the draft distributions of each position
        drafts = np.stack([rng.choice(5, NUM_SEQS, p=DRAFT[j]) for j in range(2)], axis=1)
        probs = np.broadcast_to(DRAFT, (NUM_SEQS, 2, 5))
    tokens, accepted = run_verify(drafts, probs)
    target = np.exp(TARGET)
    assert_distributed_as(tokens[:, 0], target[0])
    second = accepted >= 1  # the second output token exists only after an accepted first draft
    assert_distributed_as(tokens[second, 1], target[1])
    assert 0 < second.mean() < 1
    if probs is None:  # a rejected point-mass draft is never drawn again
        assert ((accepted[second] == 2) == (tokens[second, 1] == drafts[second, 1])).all()


def test_greedy_verification_keeps_the_matching_prefix_then_the_argmax():
    drafts = np.tile([[1, 3]], (NUM_SEQS, 1))  # argmaxes are 1, 0, 0: the first matches, the second not
    tokens, accepted = run_verify(drafts, None, temperature=0.0)
    assert (accepted == 1).all() and (tokens[:, :2] == [1, 0]).all()


def test_serve_takes_the_speculative_config_as_json(capsys):
    from serving.openai.cli import parse_args

    assert parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']).speculative_config \
        == {"method": "ngram", "num_speculative_tokens": 2}
    for bad in ("{oops", "[1]"):
        with pytest.raises(SystemExit):
            parse_args(["--speculative-config", bad])
    assert "expected a JSON object" in capsys.readouterr().err
