"""`Seq2SeqConfig`: an encoder-decoder checkpoint's fields, normalised from its transformers config.

BART, MBart, T5 / MT5, FSMT and Whisper share one Transformer encoder-decoder and differ in data:
- BART: post-LN blocks, learned positions offset by 2, `layernorm_embedding`, `scale_embedding`, a
  `final_logits_bias`; MBart: the same with pre-LN blocks and final norms on both stacks.
- T5 / MT5: pre-RMS-norm blocks without biases, no position embeddings but relative position buckets added
  to self-attention logits (bidirectional in the encoder, causal in the decoder; one table per stack),
  no query scaling, relu or gated-gelu feed-forward, final norms; T5 scales the decoder output by
  d_model^-0.5 before its tied head (transformers' `scale_decoder_outputs`), MT5 does not.
- FSMT: post-LN like BART without `layernorm_embedding`, separate source and target vocabularies, and
  fairseq's sinusoidal positions, stored in the checkpoint as tables (`padding_idx + 1` offset).
- Whisper: MBart's pre-LN blocks and final norms without `layernorm_embedding`, no `k_proj` bias, learned
  decoder positions without offset, and an encoder over log-mel features `[num_mel_bins, 2 * S]`: two
  convolutions (the second of stride 2) with GELU, plus a stored sinusoidal table of S positions. It has no
  source vocabulary (`src_vocab_size` 0) and no source mask. transformers computes but never applies its
  `embed_scale`, so `scale_embedding` is ignored here as well.
Generation settings (`decoder_start_token_id`, `forced_bos_token_id`, `forced_eos_token_id`, EOS) come
from generation_config.json where it has them, else from config.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_lib.cache_spec import CrossKV, LayerSpecs, PagedKV
from model_lib.layers.activations import ACTIVATIONS

# architecture -> weight-name kind
SEQ2SEQ_ARCHITECTURES: dict[str, str] = {
    "BartForConditionalGeneration": "bart",
    "MBartForConditionalGeneration": "bart",
    "T5ForConditionalGeneration": "t5",
    "MT5ForConditionalGeneration": "t5",
    "FSMTForConditionalGeneration": "fsmt",
    "WhisperForConditionalGeneration": "whisper",
}
T5_DEFAULT_MAX_LEN = 512  # T5's positions are relative: the bound on source and target lengths (its n_positions)
MAX_SOURCE_LEN = 1 << 16  # a bound on any encoder length
MAX_MEL_BINS = 512  # a bound on a features encoder's channels (Whisper's are 80 or 128)


@dataclass(frozen=True)
class Seq2SeqConfig:
    # Not a field: the decoder configs' switch, which the engine reads (no encoder-decoder attends in MLA form).
    attention_kind = "standard"

    architecture: str
    kind: str  # weight names: "bart" (BART, MBart), "t5" (T5, MT5), "fsmt", "whisper"
    vocab_size: int  # the decoder's (output) vocabulary
    src_vocab_size: int  # the encoder's; 0 for a features encoder
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    head_dim: int
    encoder_ffn: int
    decoder_ffn: int
    activation: str
    gated_ffn: bool  # T5 v1.1 / MT5: act(wi_0 x) * wi_1 x
    norm_kind: str  # "layer" or "rms"
    norm_eps: float
    pre_norm: bool
    embed_norm: bool  # `layernorm_embedding` after token + position embeddings
    final_norm: bool  # a norm after each stack
    embed_scale: float
    position_offset: int | None  # learned positions: table row of position 0; None: relative buckets (T5)
    relative_buckets: int
    relative_max_distance: int
    attention_bias: bool
    query_scale: float
    output_scale: float  # applied to the decoder output before the head (T5)
    final_logits_bias: bool
    shared_embeddings: bool  # one token table for encoder, decoder (and a tied head)
    tie_output: bool  # the head is the decoder's token table
    max_source_len: int
    max_position_embeddings: int  # the decoder's positions
    decoder_start_token_id: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    dtype: str = "float32"
    initializer_range: float = 0.02
    # >0: the encoder reads log-mel features `[num_mel_bins, 2 * max_source_len]` through two convolutions
    # (Whisper) instead of token ids.
    num_mel_bins: int = 0
    key_bias: bool = True  # with attention_bias: whether k_proj has one too (Whisper's has none)

    multimodal = None  # the engine's vision-language switch
    rope = None  # the engine's length check reads it
    bidirectional_spans = False  # the engine's and runner's span switches (model_lib/spans.py)
    block_causal_size = None  # block diffusion (SDAR) is decoder-only

    def spans_unsupported_reason(self, paged: bool = True) -> str | None:
        """Request spans would mark the decoder's prompt, but an encoder-decoder's prompt feeds its encoder."""
        return "an encoder-decoder's prompt feeds its encoder"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
        if not 1 <= self.max_source_len <= MAX_SOURCE_LEN:
            raise ValueError(f"the encoder length must be in [1, {MAX_SOURCE_LEN}], got {self.max_source_len}")
        if not 0 <= self.num_mel_bins <= MAX_MEL_BINS:
            raise ValueError(f"num_mel_bins must be in [0, {MAX_MEL_BINS}], got {self.num_mel_bins}")
        if (self.num_mel_bins > 0) == (self.src_vocab_size > 0):
            raise ValueError("an encoder reads either token ids (src_vocab_size > 0) or features (num_mel_bins > 0), "
                             f"got src_vocab_size {self.src_vocab_size} and num_mel_bins {self.num_mel_bins}")

    @property
    def features_encoder(self) -> bool:
        """Whether the encoder reads log-mel features (Whisper) rather than token ids."""
        return self.num_mel_bins > 0

    @property
    def feature_shape(self) -> tuple[int, int]:
        """A features encoder's input per sequence: `[num_mel_bins, 2 * max_source_len]` (one window)."""
        return self.num_mel_bins, 2 * self.max_source_len

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_layers(self) -> int:
        """Decoder layers: the ones that keep serving state."""
        return self.decoder_layers

    def layer_cache_spec(self, layer: int) -> LayerSpecs:
        """Every decoder layer: paged self-attention KV and the cross-attention KV of its slot."""
        return LayerSpecs((PagedKV(self.decoder_heads, self.head_dim),
                           CrossKV(self.decoder_heads, self.head_dim, self.max_source_len, self.dtype)))

    def replace(self, **changes: Any) -> "Seq2SeqConfig":
        return dataclasses.replace(self, **changes)


def _generation_settings(path: Path | None, hf: Any) -> dict[str, Any]:
    """decoder_start / forced BOS / forced EOS / EOS, generation_config.json over config.json."""
    keys = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "eos_token_id")
    values = {key: getattr(hf, key, None) for key in keys}
    file = None if path is None else path / "generation_config.json"
    if file is not None and file.is_file():
        stored = json.loads(file.read_text())
        values.update({key: stored[key] for key in keys if key in stored})
    return values


def _eos_ids(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else () if value is None else (int(value),)


def seq2seq_config_from_hf(hf: Any, architecture: str, path: Path | None = None) -> Seq2SeqConfig:
    """`Seq2SeqConfig` of a transformers Bart/MBart/T5/MT5/FSMT/Whisper config (`path`: its folder, for
    generation_config.json)."""
    kind = SEQ2SEQ_ARCHITECTURES[architecture]
    gen = _generation_settings(path, hf)
    pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    start = gen["decoder_start_token_id"]
    if start is None:
        start = getattr(hf, "bos_token_id", None)  # transformers' generate falls back to BOS, then refuses
    if start is None:
        raise ValueError(f"{architecture}: the config names neither decoder_start_token_id nor bos_token_id")
    common = dict(architecture=architecture, kind=kind, decoder_start_token_id=int(start),
                  forced_bos_token_id=gen["forced_bos_token_id"], forced_eos_token_id=gen["forced_eos_token_id"],
                  eos_token_ids=_eos_ids(gen["eos_token_id"]), pad_token_id=pad)
    if kind == "t5":
        length = getattr(hf, "n_positions", None) or T5_DEFAULT_MAX_LEN
        gated = bool(hf.is_gated_act)
        return Seq2SeqConfig(
            **common, vocab_size=hf.vocab_size, src_vocab_size=hf.vocab_size, d_model=hf.d_model,
            encoder_layers=hf.num_layers, decoder_layers=hf.num_decoder_layers, encoder_heads=hf.num_heads,
            decoder_heads=hf.num_heads, head_dim=hf.d_kv, encoder_ffn=hf.d_ff, decoder_ffn=hf.d_ff,
            activation=hf.dense_act_fn, gated_ffn=gated, norm_kind="rms", norm_eps=hf.layer_norm_epsilon,
            pre_norm=True, embed_norm=False, final_norm=True, embed_scale=1.0, position_offset=None,
            relative_buckets=hf.relative_attention_num_buckets,
            relative_max_distance=hf.relative_attention_max_distance, attention_bias=False, query_scale=1.0,
            output_scale=hf.d_model**-0.5 if getattr(hf, "scale_decoder_outputs", False) else 1.0,
            final_logits_bias=False, shared_embeddings=True, tie_output=True, max_source_len=length,
            max_position_embeddings=length,
        )
    if hf.d_model % hf.encoder_attention_heads or hf.d_model % hf.decoder_attention_heads:
        raise ValueError(f"{architecture}: d_model {hf.d_model} is not a multiple of the attention heads")
    if hf.encoder_attention_heads != hf.decoder_attention_heads:
        raise ValueError(f"{architecture}: encoder and decoder attention heads differ "
                         f"({hf.encoder_attention_heads}, {hf.decoder_attention_heads}); not supported")
    fsmt, whisper = kind == "fsmt", kind == "whisper"
    pre_norm = whisper or hf.model_type == "mbart"
    if whisper:
        vocab, src_vocab, offset = hf.vocab_size, 0, 0
        source_len, target_len = hf.max_source_positions, hf.max_target_positions
    else:
        vocab, src_vocab = (hf.tgt_vocab_size, hf.src_vocab_size) if fsmt else (hf.vocab_size, hf.vocab_size)
        offset, source_len = (pad + 1 if fsmt else 2), hf.max_position_embeddings
        target_len = source_len
    return Seq2SeqConfig(
        **common, vocab_size=vocab, src_vocab_size=src_vocab, d_model=hf.d_model,
        encoder_layers=hf.encoder_layers, decoder_layers=hf.decoder_layers, encoder_heads=hf.encoder_attention_heads,
        decoder_heads=hf.decoder_attention_heads, head_dim=hf.d_model // hf.decoder_attention_heads,
        encoder_ffn=hf.encoder_ffn_dim, decoder_ffn=hf.decoder_ffn_dim, activation=hf.activation_function,
        gated_ffn=False, norm_kind="layer", norm_eps=1e-5, pre_norm=pre_norm, embed_norm=not (fsmt or whisper),
        final_norm=pre_norm, embed_scale=hf.d_model**0.5 if hf.scale_embedding and not whisper else 1.0,
        position_offset=offset, relative_buckets=0, relative_max_distance=0, attention_bias=True,
        key_bias=not whisper, query_scale=(hf.d_model // hf.decoder_attention_heads)**-0.5, output_scale=1.0,
        final_logits_bias=not (fsmt or whisper), shared_embeddings=not (fsmt or whisper),
        tie_output=bool(getattr(hf, "tie_word_embeddings", True)), max_source_len=source_len,
        max_position_embeddings=target_len, initializer_range=getattr(hf, "init_std", 0.02),
        num_mel_bins=hf.num_mel_bins if whisper else 0,
    )
