"""Encoder-decoders (BART, MBart, T5, MT5, FSMT, Whisper) against transformers: teacher-forced logits on padded
batches, greedy generation through `LLM.generate` (the prompt is the encoder's input, the cross K/V sits in
the sequence's slot) token for token equal to transformers' `generate` (token encoders; Whisper's serving is
the engine's), Whisper's cross K/V written into a slot from its features and read by paged decoder steps, and
the export writing back every tensor it loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoTokenizer

import jax.numpy as jnp

from model_lib.encdec import load_seq2seq
from model_lib.encdec.export import save_seq2seq
from model_lib.layers import PagedBatch
from pallas_kernels.paged_attention import PagedMetadata
from serving import LLM, SamplingParams
from tests.seq2seq_models import SEQ2SEQ, WHISPER_IDS, build_seq2seq, features_batch, source_batch
from tests.whisper_models import END, GENERATION, PROMPT, SAMPLING_RATE, build_whisper_checkpoint, log_mel

ARCHITECTURES = list(SEQ2SEQ)
FEATURE_ARCHITECTURES = ["WhisperForConditionalGeneration"]  # encoders over log-mel features
TOKEN_ARCHITECTURES = [a for a in ARCHITECTURES if a not in FEATURE_ARCHITECTURES]
LENGTHS = (8, 5, 2)  # one source bucket (8): a single encoder compile
MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_seq2seq(request.param, folder)


def _sources(net, rows: int, seed: int = 0) -> tuple[tuple, dict]:
    """A source batch as our model takes it `(source, attention_mask)` and as transformers does (kwargs)."""
    config = net.config
    if config.features_encoder:
        features = features_batch(rows, config.num_mel_bins, 2 * config.max_source_len, seed)
        return (jnp.asarray(features), None), {"input_features": torch.tensor(features)}
    ids, mask = source_batch(LENGTHS[:rows], seed=seed, vocab=config.src_vocab_size)
    return (jnp.asarray(ids), jnp.asarray(mask)), {"input_ids": torch.tensor(ids).long(),
                                                   "attention_mask": torch.tensor(mask).long()}


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


@pytest.mark.parametrize("checkpoint", ARCHITECTURES, indirect=True)
def test_padded_logits_match_transformers(checkpoint):
    architecture, folder, reference = checkpoint
    net = load_seq2seq(folder)
    ours, theirs = _sources(net, len(LENGTHS))
    dec, dec_mask = source_batch((4, 6, 3), seed=1, vocab=net.config.vocab_size)
    dec[:, 0] = net.config.decoder_start_token_id
    with torch.no_grad():  # FSMT drops its causal mask when caching: compare with the cache off
        want = reference(**theirs, decoder_input_ids=torch.tensor(dec).long(),
                         decoder_attention_mask=torch.tensor(dec_mask).long(), use_cache=False).logits.numpy()
    got = np.asarray(net(*ours, jnp.asarray(dec), jnp.asarray(dec_mask)))
    for row, n in enumerate(dec_mask.sum(1)):
        np.testing.assert_allclose(got[row, :n], want[row, :n], atol=5e-5, rtol=0)


@pytest.mark.parametrize("checkpoint", TOKEN_ARCHITECTURES, indirect=True)
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


@pytest.mark.parametrize("checkpoint", FEATURE_ARCHITECTURES, indirect=True)
def test_features_cross_slot_and_paged_steps_match_transformers(checkpoint):
    """`fill_cross_features` writes one sequence's encoder K/V into slot 1 of 2 (slot 0 stays empty); its decoder
    prompt then runs through the serving `forward` in two chunks over 2-token pages, the second reading the
    first's pages: every token's logits equal transformers' teacher-forced ones."""
    _, folder, reference = checkpoint
    net = load_seq2seq(folder)
    config = net.config
    (features, _), theirs = _sources(net, 1, seed=3)
    dec, _ = source_batch((7,), seed=4, vocab=config.vocab_size)
    dec[0, 0] = config.decoder_start_token_id
    with torch.no_grad():
        want = reference(**theirs, decoder_input_ids=torch.tensor(dec).long(), use_cache=False).logits[0].numpy()
    with pytest.raises(ValueError, match="exactly"):
        net.encode(features[..., :-2])
    caches = net.make_kv_caches(num_pages=4, page_size=2, dtype=jnp.float32, num_slots=2)
    caches = nnx.jit(lambda m, c, f: m.fill_cross_features(c, f, jnp.int32(1)))(net, caches, features[0])
    lengths = [np.asarray(cross[2]).tolist() for _, cross in caches]
    assert lengths == [[0, config.max_source_len]] * config.decoder_layers
    step = nnx.jit(lambda m, ids, batch, c: m.forward(ids, batch, c))
    pages = jnp.arange(4, dtype=jnp.int32)[::-1][None]  # pages in reverse
    for start, stop in ((0, 3), (3, 7)):
        meta = PagedMetadata(jnp.array([0, stop - start], jnp.int32), jnp.array([stop], jnp.int32), pages, jnp.int32(1))
        batch = PagedBatch(positions=jnp.arange(start, stop, dtype=jnp.int32),
                           seq_lens=jnp.full(stop - start, stop, jnp.int32), meta=meta, slots=jnp.array([1], jnp.int32))
        logits, caches = step(net, jnp.asarray(dec[0, start:stop]), batch, caches)
        np.testing.assert_allclose(np.asarray(logits), want[start:stop], atol=5e-5, rtol=0)


@pytest.mark.parametrize("checkpoint", ARCHITECTURES, indirect=True)
def test_export_writes_back_the_loaded_tensors(checkpoint, tmp_path):
    """`save_seq2seq` of an unchanged model: the source checkpoint's tensors, names and values (Whisper's
    convolutions through our kernel layout and back)."""
    _, folder, _ = checkpoint
    save_seq2seq(load_seq2seq(folder), folder, tmp_path)
    want, got = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_whisper_untied_head_loads_as_lm_head(tmp_path):
    """A Whisper checkpoint that stores `proj_out.weight` (tie_word_embeddings false) has its own head, which
    all-linear LoRA leaves alone, as PEFT does with the output layer."""
    from model_lib.lora import target_groups

    reference = build_seq2seq("WhisperForConditionalGeneration", tmp_path, tie_word_embeddings=False)
    net = load_seq2seq(tmp_path)
    assert not net.config.tie_output
    np.testing.assert_array_equal(np.asarray(net.lm_head.kernel[...]), reference.proj_out.weight.detach().numpy().T)
    adapted = {path for parts in target_groups(net, "all-linear").values() for path, _ in parts}
    assert "lm_head" not in adapted and "model.encoder.layers.0.self_attn.k_proj" in adapted


def test_whisper_folder_generation_matches_our_logits(tmp_path):
    """The serving-ready tiny Whisper folder (`tests/whisper_models.py`): transformers' tokenizer, feature
    extractor and Whisper `generate` read it; over the decoder prompt `PROMPT` plus what `generate` returned,
    our logits with the generation config's suppressions pick every token transformers picked."""
    reference = build_whisper_checkpoint(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.convert_tokens_to_ids(list(WHISPER_IDS)) == list(WHISPER_IDS.values())
    rng = np.random.RandomState(0)
    tone = np.sin(2 * np.pi * 440 * np.arange(SAMPLING_RATE) / SAMPLING_RATE) * 0.5
    features = log_mel([rng.randn(SAMPLING_RATE) * 0.1, tone, rng.randn(SAMPLING_RATE // 2)], tmp_path)
    with torch.no_grad():
        out = reference.generate(features, language="en", task="transcribe", max_new_tokens=MAX_NEW).numpy()
    net = load_seq2seq(tmp_path)
    assert (net.config.decoder_start_token_id, net.config.eos_token_ids) == (PROMPT[0], (END,))
    sequences = np.concatenate([np.tile(PROMPT, (len(out), 1)), out], axis=1)
    logits = np.array(net(jnp.asarray(features.numpy()), None, jnp.asarray(sequences)))[:, len(PROMPT) - 1:-1]
    logits[..., GENERATION["suppress_tokens"]] = -np.inf
    logits[:, 0, GENERATION["begin_suppress_tokens"]] = -np.inf
    for got, want in zip(logits.argmax(-1).tolist(), out.tolist()):
        n = want.index(END) + 1 if END in want else len(want)  # transformers pads after EOS
        assert got[:n] == want[:n]
    assert len({tuple(row) for row in out.tolist()}) == len(out)  # the audio matters
    text = tokenizer.decode(sequences[0], skip_special_tokens=True)
    assert "<|" not in text and text == tokenizer.decode([t for t in out[0] if t < END])  # specials start at END


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    from pallas_kernels.position_bias import relative_bucket

    relative = np.arange(-300, 300)
    want = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional=bidirectional, num_buckets=32,
                                                 max_distance=128).numpy()
    got = relative_bucket(jnp.asarray(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(got), want)
