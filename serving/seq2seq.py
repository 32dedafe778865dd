"""Encoder-decoders in the engine: the prompt is the encoder's input, the decoder generates.

`Seq2SeqEncoder` is the engine's encoder for such a model (as `serving/multimodal/encoder.py` is for
images). A request's prompt ids become its sequences' `encoder_ids`, or for Whisper its audio's log-mel
features their `encoder_features` (one 30 s window; the request's prompt is then the decoder's, built by
`serving/audio/whisper.py`); a token source's decoder prompt is
`[decoder_start_token_id]`, plus `forced_bos_token_id` where the generation config forces one (as vLLM
does: the forced token is part of the decoder prompt, not of the output). When a sequence takes its slot
(and again after a preemption, which recomputes it), `fill` runs the encoder over its source and writes
every decoder layer's cross K/V into the slot's `CrossKV` rows, before the step that prefills its decoder
prompt; the scheduler admits at most `budget` source tokens of such sequences per step. The source pads
to a power of two (at most `max_source_len`), so the encoder compiles once per length bucket.
`forced_eos_token_id` replaces the last token a sequence may generate (`max_tokens`) with EOS, as
transformers' `ForcedEOSTokenLogitsProcessor` does at `max_length`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from model_lib.encdec import Seq2SeqLM, load_seq2seq
from serving.engine.runner import ModelRunner, bucket
from serving.engine.scheduler import ScheduledSequence
from serving.engine.sequence import Sequence

MIN_SOURCE_BUCKET = 8
MAX_ENCODER_BUDGET = 1 << 20  # a bound on max_num_encoder_input_tokens


def _fill(graphdef, state, kv_caches, input_ids, length, slot):
    return nnx.merge(graphdef, state).fill_cross(kv_caches, input_ids, length, slot)


def _fill_features(graphdef, state, kv_caches, features, slot):
    return nnx.merge(graphdef, state).fill_cross_features(kv_caches, features, slot)


class Seq2SeqEncoder:
    """Runs a `Seq2SeqLM`'s encoder for the engine, one sequence at a time."""

    def __init__(self, model: Seq2SeqLM, budget: int):
        self.config = model.config
        self.budget = budget
        self.graphdef, self.state = nnx.split(model)
        self._fill = jax.jit(_fill, static_argnums=0, donate_argnums=(2,))
        self._fill_features = jax.jit(_fill_features, static_argnums=0, donate_argnums=(2,))
        forced_bos = self.config.forced_bos_token_id
        self.decoder_prompt = [self.config.decoder_start_token_id] + ([] if forced_bos is None else [forced_bos])
        self.num_encoded = 0  # sources run through the encoder (a preempted sequence counts again)

    def validate_features(self, features: np.ndarray) -> None:
        """ValueError, naming the problem, for audio features the encoder cannot take."""
        if not self.config.features_encoder:
            raise ValueError(f"{self.config.architecture} takes no audio; its encoder reads the prompt's tokens")
        shape = self.config.feature_shape
        if not isinstance(features, np.ndarray) or features.dtype != np.float32 or features.shape != shape:
            got = getattr(features, "shape", type(features).__name__)
            raise ValueError(f"audio features must be a float32 array {list(shape)} "
                             f"(num_mel_bins, frames), got {got}")
        if not np.isfinite(features).all():
            raise ValueError("audio features hold non-finite values")

    def validate_source(self, ids: list[int]) -> None:
        """ValueError, naming the problem, for a source the encoder cannot take."""
        if self.config.features_encoder:
            raise ValueError(f"{self.config.architecture} transcribes audio: send audio (/v1/audio/transcriptions, "
                             "LLM.transcribe), not a text prompt")
        if not ids:
            raise ValueError("the prompt is empty")
        vocab, limit = self.config.src_vocab_size, self.config.max_source_len
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) > limit:
            raise ValueError(f"prompt is {len(ids)} tokens; this encoder takes at most {limit}")

    def validate_decoder_prompt(self, ids: list[int], max_model_len: int) -> None:
        """ValueError for a decoder prompt (beam search's beams) outside the vocabulary or without room to grow."""
        vocab = self.config.vocab_size
        if not ids or any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"the decoder prompt must be token ids in [0, {vocab}), at least one")
        if len(ids) >= max_model_len:
            raise ValueError(f"the decoder prompt is {len(ids)} tokens; max_model_len is {max_model_len}, "
                             "which must leave room for at least one generated token")

    def needs_encoder(self, seq: Sequence) -> bool:
        """Whether `seq`'s next step starts it (its slot holds no cross K/V of it yet)."""
        return seq.encoder_len > 0 and seq.num_computed == 0

    def fill(self, runner: ModelRunner, scheduled: Iterable[ScheduledSequence]) -> None:
        """Encode the sources of the sequences this step starts into their slots' cross K/V."""
        for item in scheduled:
            seq = item.seq
            if not self.needs_encoder(seq):
                continue
            self.num_encoded += 1
            if seq.encoder_features is not None:
                runner.kv_caches = self._fill_features(self.graphdef, self.state, runner.kv_caches,
                                                       seq.encoder_features, np.int32(seq.slot))
                continue
            n = len(seq.encoder_ids)
            ids = np.full(bucket(n, MIN_SOURCE_BUCKET, self.config.max_source_len), self.config.pad_token_id, np.int32)
            ids[:n] = seq.encoder_ids
            runner.kv_caches = self._fill(self.graphdef, self.state, runner.kv_caches, ids, np.int32(n),
                                          np.int32(seq.slot))

    def forced_token(self, seq: Sequence, token: int) -> int:
        """`token`, or EOS where it is the last one `seq` may generate and the config forces EOS there."""
        forced = self.config.forced_eos_token_id
        return forced if forced is not None and len(seq.output_ids) + 1 >= seq.max_tokens else token


def seq2seq_encoder(model: Any, budget: int | None, max_num_batched_tokens: int) -> Seq2SeqEncoder | None:
    """The engine's encoder for an encoder-decoder (None for other models), under a checked per-step budget
    of source tokens (default: max(max_num_batched_tokens, the longest source))."""
    if not isinstance(model, Seq2SeqLM):
        return None
    longest = model.config.max_source_len
    budget = max(max_num_batched_tokens, longest) if budget is None else budget
    if not longest <= budget <= MAX_ENCODER_BUDGET:
        raise ValueError(f"max_num_encoder_input_tokens must be in [{longest} (the longest source), "
                         f"{MAX_ENCODER_BUDGET}], got {budget}")
    return Seq2SeqEncoder(model, budget)


def seq2seq_engine_model(path: str | Path, *, dtype: Any, plan: Any, quantization: str | None,
                         engine_args: dict[str, Any]) -> Seq2SeqLM:
    """Load an encoder-decoder for `LLM`, refusing the options it does not serve yet (by name); sets the
    engine's unrolled layer loop (the decoder's layers hold two pools each)."""
    unsupported = {"mesh": plan is not None, "quantization": quantization is not None,
                   "multi-host": jax.process_count() > 1, "enable_lora": bool(engine_args.get("enable_lora")),
                   "speculative_config": bool(engine_args.get("speculative_config")),
                   "scan_layers": bool(engine_args.get("scan_layers"))}
    refused = [name for name, used in unsupported.items() if used]
    if refused:
        raise ValueError(f"encoder-decoder models do not support {', '.join(refused)} yet")
    engine_args["scan_layers"] = False
    return load_seq2seq(path, dtype=dtype)


__all__ = ["Seq2SeqEncoder", "seq2seq_encoder", "seq2seq_engine_model"]
