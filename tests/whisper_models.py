"""A tiny Whisper checkpoint folder as serving reads one: the random model of `seq2seq_models.SEQ2SEQ` with
wider noise (std `WIDE`: greedy outputs then differ with the audio and over steps), its generation_config.json
with Whisper's generation fields, a feature extractor of 8 mel bins over 1-second windows (100 frames =
2 * max_source_positions), and the tiny tokenizer with Whisper's special tokens.

Ids: 0..127 the tiny tokenizer's ordinary tokens (3 is " "), then `WHISPER_IDS`: 128 <|endoftext|> (EOS, pad,
BOS), 129 <|startoftranscript|> (decoder start), 130 <|en|>, 131 <|de|>, 132 <|translate|>, 133 <|transcribe|>,
134 <|startofprev|>, 135 <|nospeech|>, 136 <|notimestamps|>. The vocabulary ends there: no timestamp tokens.
transformers' `generate(input_features, language="en", task="transcribe")` prompts the decoder with
`[<|startoftranscript|>, <|en|>, <|transcribe|>, <|notimestamps|>]` = [129, 130, 133, 136] (`PROMPT`) and, for
such short-form audio, returns the generated tokens only, without that prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from tests.seq2seq_models import WHISPER_DIMS, WHISPER_IDS, WHISPER_SPACE, WHISPER_SPECIAL, build_seq2seq
from tests.tiny_models import build_tokenizer

ARCHITECTURE = "WhisperForConditionalGeneration"
END = WHISPER_IDS["<|endoftext|>"]
PROMPT = [WHISPER_IDS[t] for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
WIDE = 0.3
SAMPLING_RATE = 16000
FEATURES = dict(feature_size=WHISPER_DIMS["num_mel_bins"], sampling_rate=SAMPLING_RATE, hop_length=160,
                chunk_length=1, n_fft=400)
# Real checkpoints' generation_config.json fields (their values for the tiny vocabulary).
GENERATION = dict(
    decoder_start_token_id=WHISPER_IDS["<|startoftranscript|>"], bos_token_id=END, eos_token_id=END,
    pad_token_id=END, lang_to_id={t: WHISPER_IDS[t] for t in ("<|en|>", "<|de|>")},
    task_to_id={"transcribe": WHISPER_IDS["<|transcribe|>"], "translate": WHISPER_IDS["<|translate|>"]},
    no_timestamps_token_id=WHISPER_IDS["<|notimestamps|>"], prev_sot_token_id=WHISPER_IDS["<|startofprev|>"],
    suppress_tokens=[1, 2, 5, 7], begin_suppress_tokens=[WHISPER_SPACE, END], is_multilingual=True,
    max_initial_timestamp_index=50, return_timestamps=False, max_length=WHISPER_DIMS["max_target_positions"],
)


def whisper_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny tokenizer with Whisper's special tokens at ids VOCAB.. and <|endoftext|> as BOS, EOS and pad."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(WHISPER_SPECIAL)})
    tokenizer.add_special_tokens({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                  "pad_token": "<|endoftext|>"})
    assert tokenizer.convert_tokens_to_ids(list(WHISPER_SPECIAL)) == list(WHISPER_IDS.values())
    return tokenizer


def build_whisper_checkpoint(folder: Path) -> nn.Module:
    """Save the tiny random Whisper, its generation config, feature extractor and tokenizer to `folder`; return
    the transformers model (float32, eval mode, generating with that generation config)."""
    model = build_seq2seq(ARCHITECTURE, folder)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WIDE)
    model.generation_config = transformers.GenerationConfig(**GENERATION)
    model.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(**FEATURES).save_pretrained(folder)
    whisper_tokenizer().save_pretrained(folder)
    return model


def log_mel(audios: list, folder: Path) -> torch.Tensor:
    """`input_features [B, 8, 100]` of 16 kHz waveforms (each cut or padded to one second) by the folder's
    feature extractor."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    return extractor(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
