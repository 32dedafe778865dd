"""Logit parity with transformers (PyTorch, CPU, float32) for every tiny case."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import model_lib
from tests.tiny_models import (
    CASES,
    CASES_BY_NAME,
    ONE_PER_ARCHITECTURE,
    SEQ_LEN,
    assert_logits_close,
    hf_logits,
    ci_rows,
    padded_batch,
    random_ids,
)


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_logits_match_transformers(case, tiny_checkpoint, forward):
    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    assert model.config.architecture == CASES_BY_NAME[case].hf_architecture()

    ids = random_ids(2, SEQ_LEN, seed=1)
    ours = forward(model, ids, np.ones_like(ids))
    assert ours.dtype == jnp.float32 and ours.shape == (2, SEQ_LEN, hf_model.config.get_text_config().vocab_size)
    assert_logits_close(ours, hf_logits(hf_model, ids))

    # Left and right padding: real tokens get the logits of the unpadded sequence.
    ids, mask, spans = padded_batch(seed=2)
    ours = np.asarray(forward(model, ids, mask))
    assert np.isfinite(ours).all()
    for row, (start, end) in enumerate(spans):
        ref = hf_logits(hf_model, ids[row : row + 1, start:end])[0]
        assert_logits_close(ours[row, start:end], ref)


@pytest.mark.parametrize("case", ci_rows(ONE_PER_ARCHITECTURE))
def test_bfloat16_load_stays_close(case, tiny_checkpoint, forward):
    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder, dtype="bfloat16")
    assert model.model.embed_tokens.weight[...].dtype == jnp.bfloat16
    ids = random_ids(2, SEQ_LEN, seed=3)
    ours = forward(model, ids, np.ones_like(ids))
    assert ours.dtype == jnp.float32
    assert_logits_close(ours, hf_logits(hf_model, ids), rel=3e-2)


def test_packed_segments_do_not_attend_across(tiny_checkpoint):
    """Two sequences packed in one row give the logits each gives alone."""
    folder, hf_model = tiny_checkpoint("gemma3-local-global")
    model = model_lib.from_pretrained(folder)
    ids = random_ids(1, SEQ_LEN, seed=4)
    segments = np.array([[1] * 5 + [2] * 6 + [0]], np.int32)
    ours = np.asarray(model(ids, segment_ids=segments))
    assert_logits_close(ours[0, :5], hf_logits(hf_model, ids[:, :5])[0])
    assert_logits_close(ours[0, 5:11], hf_logits(hf_model, ids[:, 5:11])[0])


@pytest.mark.parametrize("case", ["phi3-longrope-partial", "llama-dynamic"])
def test_length_dependent_rope_within_original_length(case, tiny_checkpoint, forward):
    """Sequences inside the pretrained length use LongRoPE's short factors / unscaled NTK."""
    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    ids = random_ids(2, 6, seed=5)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), hf_logits(hf_model, ids))
