"""Encoder-decoders (BART, MBart, T5, MT5, FSMT) against transformers: teacher-forced logits on padded
batches, and greedy generation through `LLM.generate` (the prompt is the encoder's input, the cross K/V
sits in the sequence's slot) token for token equal to transformers' `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from model_lib.encdec import load_seq2seq
from serving import LLM, SamplingParams
from tests.seq2seq_models import SEQ2SEQ, build_seq2seq, source_batch

ARCHITECTURES = list(SEQ2SEQ)
LENGTHS = (8, 5, 2)  # one source bucket (8): a single encoder compile
MAX_NEW = 8


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_seq2seq(request.param, folder)


def _hf_generate(reference, ids: np.ndarray, mask: np.ndarray, eos: set[int]) -> list[list[int]]:
    """transformers' greedy outputs without the decoder start token, cut after the first EOS."""
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                 do_sample=False, num_beams=1, max_new_tokens=MAX_NEW).numpy()
    rows = []
    for row in out[:, 1:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def test_padded_logits_match_transformers(checkpoint):
    architecture, folder, reference = checkpoint
    net = load_seq2seq(folder)
    ids, mask = source_batch(LENGTHS, vocab=net.config.src_vocab_size)
    dec, dec_mask = source_batch((4, 6, 3), seed=1, vocab=net.config.vocab_size)
    dec[:, 0] = net.config.decoder_start_token_id
    with torch.no_grad():  # FSMT drops its causal mask when caching: compare with the cache off
        want = reference(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                         decoder_input_ids=torch.tensor(dec).long(), decoder_attention_mask=torch.tensor(dec_mask).long(),
                         use_cache=False).logits.numpy()
    got = np.asarray(net(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), jnp.asarray(dec_mask)))
    for row, n in enumerate(dec_mask.sum(1)):
        np.testing.assert_allclose(got[row, :n], want[row, :n], atol=5e-5, rtol=0)


def test_greedy_generation_matches_transformers(checkpoint):
    architecture, folder, reference = checkpoint
    # Eight pages of 2 tokens for three sequences of up to 9 tokens: the last started is preempted (unless
    # EOS ends the others early), and its recomputation runs the encoder again into its new slot.
    llm = LLM(str(folder), max_model_len=16, max_num_seqs=4, max_num_batched_tokens=64, num_pages=8, page_size=2)
    config = llm.engine.model_config
    ids, mask = source_batch(LENGTHS, seed=2, vocab=config.src_vocab_size)
    want = _hf_generate(reference, ids, mask, set(config.eos_token_ids))
    prompts = [{"prompt_token_ids": ids[r, :n].tolist()} for r, n in enumerate(LENGTHS)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
    assert [o.prompt_token_ids for o in outputs] == [p["prompt_token_ids"] for p in prompts]
    preemptions = llm.engine.scheduler.num_preemptions
    assert llm.engine.seq2seq.num_encoded == len(prompts) + preemptions
    assert preemptions > 0 or sum(-(-len(row) // 2) for row in want) <= 8  # the pages held everything


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    from pallas_kernels.position_bias import relative_bucket

    relative = np.arange(-300, 300)
    want = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional=bidirectional, num_buckets=32,
                                                 max_distance=128).numpy()
    got = relative_bucket(jnp.asarray(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(got), want)
