"""Mamba, Mamba-2 and RecurrentGemma beyond the parity table: packed rows, and the serving forward step by step
against transformers' cached decode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model_lib
from model_lib.layers import PagedBatch
from pallas_kernels.paged_attention import PagedMetadata
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids

CASES = ["mamba-tied", "mamba2-groups-chunked", "recurrentgemma-local-mqa"]


@nnx.jit
def _packed(model, ids, segment_ids):
    return model(ids, segment_ids=segment_ids)


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_equal_each_sequence_alone(case, tiny_checkpoint):
    """Three sequences packed in one row (then padding) give the logits each gives alone: the
    state and the conv window restart at every segment."""
    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    ids = random_ids(1, SEQ_LEN, seed=4)
    segments = np.array([[1] * 5 + [2] * 2 + [3] * 4 + [0]], np.int32)
    ours = np.asarray(_packed(model, ids, segments))
    for start, end in [(0, 5), (5, 7), (7, 11)]:
        assert_logits_close(ours[0, start:end], hf_logits(hf_model, ids[:, start:end])[0])


@nnx.jit
def _step(model, ids, batch, caches, logits_indices):
    return model.forward(ids, batch, caches, logits_indices)


TOKENS, SEQS, SLOTS = 12, 3, 4  # padded step shape; slot SLOTS - 1 is the padding rows' scratch
PAGE_SIZE, PAGES_PER_SEQ = 4, 3  # attention layers: slot s owns pages 3s..3s+2 (12 tokens)


def _paged_batch(chunks: list[tuple[int, int, int]]) -> PagedBatch:
    """A step of `(slot, tokens before, new tokens)` per sequence, padded to TOKENS and SEQS."""
    counts = np.array([n for _, _, n in chunks], np.int32)
    cu = np.full(SEQS + 1, counts.sum(), np.int32)
    cu[0], cu[1 : len(chunks) + 1] = 0, np.cumsum(counts)
    kv = np.zeros(SEQS, np.int32)
    kv[: len(chunks)] = [done + n for _, done, n in chunks]
    slots = np.full(SEQS, SLOTS - 1, np.int32)
    slots[: len(chunks)] = [slot for slot, _, _ in chunks]
    positions = np.zeros(TOKENS, np.int32)
    positions[: counts.sum()] = np.concatenate([np.arange(done, done + n) for _, done, n in chunks])
    pages = slots[:, None] * PAGES_PER_SEQ + np.arange(PAGES_PER_SEQ, dtype=np.int32)
    meta = PagedMetadata(jnp.asarray(cu), jnp.asarray(kv), jnp.asarray(pages), jnp.int32(len(chunks)))
    return PagedBatch(positions=jnp.asarray(positions), seq_lens=jnp.asarray(positions + 1), meta=meta,
                      slots=jnp.asarray(slots))


@pytest.mark.parametrize("case", CASES)
def test_serving_steps_match_transformers_cached_decode(case, tiny_checkpoint):
    """Two sequences through the ragged forward: a prefill split over two chunks, a mixed
    prefill + decode step, then decode steps, each sequence in its own slot (the pool's rows
    hold stale values first: a sequence starting at position 0 must ignore them). Every
    step's logits equal those transformers' generate computes on its cached decode path."""
    import torch

    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    prompts = [random_ids(1, 7, seed=5)[0].tolist(), random_ids(1, 5, seed=6)[0].tolist()]
    new = 4
    reference = []
    for p in prompts:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        reference.append((out.sequences[0].tolist(), [lg[0].float().numpy() for lg in out.logits]))
    caches = model.make_kv_caches(SLOTS * PAGES_PER_SEQ, PAGE_SIZE, jnp.float32, num_slots=SLOTS)
    caches = [tuple(pool + 1.0 for pool in cache) for cache in caches]  # stale rows (and stale KV pages)
    slots = [2, 0]
    done = [0, 0]
    # Steps as (sequence, new tokens): A's prompt in 4 + 3, B's prompt at once, then decodes.
    plan = [[(0, 4), (1, 5)], [(0, 3), (1, 1)]] + [[(0, 1), (1, 1)]] * (new - 1)
    checked = [0, 0]
    for step in plan:
        ids = np.zeros(TOKENS, np.int32)
        chunks, at = [], 0
        for s, n in step:
            ids[at : at + n] = reference[s][0][done[s] : done[s] + n]
            chunks.append((slots[s], done[s], n))
            at += n
        batch = _paged_batch(chunks)
        last = np.asarray(batch.meta.cu_q_lens[1 : SEQS + 1]) - 1
        logits, caches = _step(model, jnp.asarray(ids), batch, caches, jnp.asarray(np.maximum(last, 0)))
        for row, (s, n) in enumerate(step):
            done[s] += n
            k = done[s] - len(prompts[s])  # index of the token these logits predict
            if 0 <= k < new:
                assert_logits_close(np.asarray(logits[row]), reference[s][1][k])
                checked[s] += 1
    assert checked == [new, new]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type 'linear' is not supported"),
        (dict(lru_width=30), r"RG-LRU layers need ssm_num_heads \(4\) gate blocks dividing ssm_intermediate_size \(30\)"),
        (dict(conv1d_width=40), "1 <= ssm_conv_kernel <= 16"),
        (dict(attention_window_size=0), "sliding-window layers need a positive sliding_window"),
    ],
)
def test_recurrent_gemma_refuses_what_it_cannot_run(overrides, message):
    """Config values RecurrentGemma cannot honour (or that break a bound) are named, not run wrongly."""
    import dataclasses

    from model_lib.families.recurrent_gemma import recurrent_gemma_config
    from tests.tiny_models import CASES_BY_NAME

    case = CASES_BY_NAME["recurrentgemma-local-mqa"]
    hf = dataclasses.replace(case, overrides={**case.overrides, **overrides}).hf_config()
    with pytest.raises(ValueError, match=message):
        recurrent_gemma_config(hf, "RecurrentGemmaForCausalLM")


def test_recurrent_gemma_embedding_scale_is_rounded_to_bfloat16():
    """transformers keeps sqrt(hidden) as a bfloat16 buffer whatever the model dtype: 2560 -> 50.5, not 50.596."""
    from model_lib.families.recurrent_gemma import recurrent_gemma_config
    from tests.tiny_models import CASES_BY_NAME

    hf = CASES_BY_NAME["recurrentgemma-local-mqa"].hf_config()
    hf.hidden_size = 2560
    assert recurrent_gemma_config(hf, "RecurrentGemmaForCausalLM").embedding_multiplier == 50.5
