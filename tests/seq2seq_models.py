"""Tiny encoder-decoder checkpoints built at test time (transformers classes, random weights perturbed so that
every parameter matters): BART, MBart, T5 (v1.0: relu, tied head), MT5 (v1.1: gated-gelu, untied), FSMT and
Whisper (8 mel bins, 100 frames -> 50 encoder positions; `tests/whisper_models.py` adds what serving needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from tests.encoder_models import perturb
from tests.tiny_models import VOCAB

BART_DIMS = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
# Whisper's special tokens follow the tiny tokenizer's ordinary ones (ids VOCAB..); the tied head covers them.
WHISPER_SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                   "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
WHISPER_IDS = {token: VOCAB + i for i, token in enumerate(WHISPER_SPECIAL)}
WHISPER_SPACE = 3  # the tiny tokenizer's " ": suppressed at the first step, as Whisper's 220
WHISPER_DIMS = dict(
    vocab_size=VOCAB + len(WHISPER_SPECIAL), num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
    max_source_positions=50, max_target_positions=64, pad_token_id=WHISPER_IDS["<|endoftext|>"],
    bos_token_id=WHISPER_IDS["<|endoftext|>"], eos_token_id=WHISPER_IDS["<|endoftext|>"],
    decoder_start_token_id=WHISPER_IDS["<|startoftranscript|>"],
    begin_suppress_tokens=[WHISPER_SPACE, WHISPER_IDS["<|endoftext|>"]])
T5_DIMS = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)

# architecture -> (config class, config fields)
SEQ2SEQ: dict[str, tuple[str, dict]] = {
    "BartForConditionalGeneration": ("BartConfig", dict(BART_DIMS, scale_embedding=True)),
    "MBartForConditionalGeneration": ("MBartConfig", dict(BART_DIMS, decoder_start_token_id=2)),
    "T5ForConditionalGeneration": ("T5Config", dict(T5_DIMS, feed_forward_proj="relu", decoder_start_token_id=0)),
    "MT5ForConditionalGeneration": ("MT5Config", dict(T5_DIMS, feed_forward_proj="gated-gelu",
                                                      tie_word_embeddings=False)),
    "FSMTForConditionalGeneration": ("FSMTConfig", dict(
        langs=["en", "de"], src_vocab_size=VOCAB + 13, tgt_vocab_size=VOCAB, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_position_embeddings=64, scale_embedding=True, tie_word_embeddings=False)),
    "WhisperForConditionalGeneration": ("WhisperConfig", WHISPER_DIMS),
}


def build_seq2seq(architecture: str, folder: Path, **overrides) -> nn.Module:
    """A tiny random `architecture` saved to `folder` (float32, eval mode)."""
    torch.manual_seed(0)
    config_class, fields = SEQ2SEQ[architecture]
    config = getattr(transformers, config_class)(**{**fields, **overrides})
    model = getattr(transformers, architecture)(config).float().eval()
    perturb(model)
    model.save_pretrained(folder)
    return model


def source_batch(lengths=(9, 5, 2), seed: int = 0, vocab: int = VOCAB):
    """Right-padded encoder ids (real tokens >= 3) and mask `[B, S]`."""
    rng = np.random.RandomState(seed)
    ids = np.ones((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.randint(3, vocab, n)
        mask[row, :n] = 1
    return ids, mask


def features_batch(rows: int, num_mel_bins: int, frames: int, seed: int = 0) -> np.ndarray:
    """Log-mel-like encoder inputs `[B, M, frames]` (float32), as a features encoder (Whisper) reads them."""
    return np.random.RandomState(seed).randn(rows, num_mel_bins, frames).astype(np.float32)
