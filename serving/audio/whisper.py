"""Whisper transcription requests: audio -> windows of log-mel features, each with the decoder prompt and
the token masks that transformers' `WhisperForConditionalGeneration.generate` uses.

- Features: the checkpoint's `WhisperFeatureExtractor` (preprocessor_config.json), one request per
  `chunk_length`-second window (30 s as published; the last one padded), the windows' texts joined.
  Windows are transcribed independently, together in one batch (no conditioning on the previous
  window's text, transformers' `condition_on_prev_tokens=False` default).
- Decoder prompt, as transformers builds it: `[<|startofprev|>, " " + prompt tokens]` when a prompt is
  given (its last `max_target_positions // 2 - 1` tokens, as openai-whisper cuts it), then
  `<|startoftranscript|>`, the language and task tokens (multilingual models), `<|notimestamps|>`.
- Language: a code ("en"), a name ("english") or a token ("<|en|>"); unset on a multilingual model it is
  detected per window, as transformers does: the most likely language token after `<|startoftranscript|>`.
- Token masks: `suppress_tokens` at every step and `begin_suppress_tokens` at the first generated token
  (generation_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.audio.decode import decode_audio, mono, resample
from serving.structured.token_masks import TokenMasks

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class WhisperTokens:
    """The special token ids of a Whisper checkpoint's generation config."""

    start: int  # <|startoftranscript|>
    languages: dict[str, int]  # "<|en|>" -> id
    tasks: dict[str, int]  # "transcribe" / "translate" -> id
    no_timestamps: int | None
    previous: int | None  # <|startofprev|>
    multilingual: bool
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]

    @classmethod
    def load(cls, path: Path) -> "WhisperTokens":
        file = path / "generation_config.json"
        if not file.is_file():
            raise ValueError(f"{path} has no generation_config.json: Whisper's special tokens are defined there")
        gen = json.loads(file.read_text())
        if gen.get("decoder_start_token_id") is None:
            raise ValueError(f"{file} names no decoder_start_token_id (<|startoftranscript|>)")
        languages = dict(gen.get("lang_to_id") or {})
        multilingual = bool(gen.get("is_multilingual", bool(languages)))
        if multilingual and not (languages and gen.get("task_to_id")):
            raise ValueError(f"{file}: a multilingual Whisper needs lang_to_id and task_to_id")
        return cls(start=int(gen["decoder_start_token_id"]), languages=languages, tasks=dict(gen.get("task_to_id") or {}),
                   no_timestamps=gen.get("no_timestamps_token_id"), previous=gen.get("prev_sot_token_id"),
                   multilingual=multilingual,
                   suppress=tuple(gen.get("suppress_tokens") or ()),
                   begin_suppress=tuple(gen.get("begin_suppress_tokens") or ()))

    def language_id(self, language: str) -> int:
        """The token of `language`: a code ("en"), an English name ("english") or the token ("<|en|>")."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        name = language.strip().lower()
        token = name if name.startswith("<|") else f"<|{TO_LANGUAGE_CODE.get(name, name)}|>"
        if token not in self.languages:
            known = ", ".join(sorted(t[2:-2] for t in self.languages))
            raise ValueError(f"language {language!r} is not one this model knows ({known or 'none: English only'})")
        return self.languages[token]

    def decoder_prompt(self, language_id: int | None, task: str, prompt_ids: list[int], max_prompt: int) -> list[int]:
        """The decoder's prompt for a window (`language_id` None: English-only model)."""
        if not self.multilingual and task != "transcribe":
            raise ValueError(f"this is an English-only model: it transcribes, it does not {task}")
        prefix = []
        if prompt_ids:
            if self.previous is None:
                raise ValueError("this model's generation config has no prev_sot_token_id: it takes no prompt")
            prefix = [self.previous, *prompt_ids[-max_prompt:]]
        tokens = [self.start]
        if self.multilingual:
            if task not in self.tasks:
                raise ValueError(f"task {task!r}: this model does {', '.join(self.tasks) or 'no task tokens'}")
            tokens += [language_id, self.tasks[task]]
        if self.no_timestamps is not None:
            tokens.append(self.no_timestamps)
        return prefix + tokens


@dataclass(frozen=True)
class WindowRequest:
    """One window's engine request (`LLMEngine.add_request` arguments)."""

    prompt_ids: list[int]
    features: np.ndarray  # [num_mel_bins, frames] float32
    token_masks: TokenMasks


class Transcriber:
    """Builds a Whisper checkpoint's transcription requests (`from_pretrained`: its folder)."""

    def __init__(self, feature_extractor: Any, tokens: WhisperTokens, tokenizer: Any, vocab_size: int,
                 max_target_positions: int):
        self.feature_extractor = feature_extractor
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.max_prompt = max_target_positions // 2 - 1
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.window = int(feature_extractor.n_samples)  # samples per window
        self.masks = TokenMasks.suppressing(vocab_size, tokens.suppress, tokens.begin_suppress)
        self.detection = TokenMasks.allowing(vocab_size, tokens.languages.values()) if tokens.multilingual else None

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: Any, vocab_size: int, max_target_positions: int) -> "Transcriber":
        from transformers import WhisperFeatureExtractor

        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            raise ValueError(f"{path} has no preprocessor_config.json (Whisper's feature extractor settings)")
        return cls(WhisperFeatureExtractor.from_pretrained(path), WhisperTokens.load(path), tokenizer, vocab_size,
                   max_target_positions)

    def samples(self, audio: bytes | np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
        """Mono float32 samples at the model's rate from a file's bytes or from samples at `sampling_rate`."""
        if isinstance(audio, (bytes, bytearray)):
            samples = decode_audio(bytes(audio), self.sampling_rate)
        elif sampling_rate is None:
            raise ValueError("audio given as samples needs its sampling_rate")
        else:
            samples = resample(mono(audio), int(sampling_rate), self.sampling_rate)
        if not samples.size or not np.isfinite(samples).all():
            raise ValueError("the audio must hold at least one sample and only finite ones")
        return samples

    def features(self, samples: np.ndarray) -> list[np.ndarray]:
        """Log-mel features `[num_mel_bins, frames]` of every window of `samples`."""
        windows = [samples[start:start + self.window] for start in range(0, max(len(samples), 1), self.window)]
        extracted = self.feature_extractor(windows, sampling_rate=self.sampling_rate, return_tensors="np")
        return [np.ascontiguousarray(f, np.float32) for f in extracted["input_features"]]

    def prompt_ids(self, prompt: str | None) -> list[int]:
        """A text prompt's tokens (" " + the stripped text, as transformers' `get_prompt_ids`)."""
        if not prompt or not prompt.strip():
            return []
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer to read a text prompt with")
        return list(self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False))

    def detection_request(self, features: np.ndarray) -> WindowRequest:
        """The one-token request whose answer is the window's language token."""
        return WindowRequest([self.tokens.start], features, self.detection)

    def requests(self, features: list[np.ndarray], language_ids: list[int | None], task: str,
                 prompt: str | None) -> list[WindowRequest]:
        """Each window's transcription request (`language_ids`: per window; None on English-only models)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        prompt_ids = self.prompt_ids(prompt)
        return [WindowRequest(self.tokens.decoder_prompt(language, task, prompt_ids, self.max_prompt), f, self.masks)
                for f, language in zip(features, language_ids)]

    def needs_detection(self, language: str | None) -> bool:
        return language is None and self.detection is not None

    def language_ids(self, language: str | None, num_windows: int) -> list[int | None]:
        """Each window's language token where no detection is needed (None on English-only models, which
        take no language but English)."""
        if not self.tokens.multilingual:
            if language is not None and language.strip().lower() not in ("en", "english", "<|en|>"):
                raise ValueError(f"this is an English-only model; language {language!r} is not English")
            return [None] * num_windows
        if language is None:
            raise ValueError("a multilingual model needs a language, or its detection first (needs_detection)")
        return [self.tokens.language_id(language)] * num_windows


def join_texts(texts: list[str]) -> str:
    """The windows' texts as one transcript."""
    return " ".join(t.strip() for t in texts if t.strip())
