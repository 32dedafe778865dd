"""Encoder-decoders (BART, MBart, T5, MT5, FSMT, Whisper): config, model, weights and loading."""

from model_lib.encdec.config import SEQ2SEQ_ARCHITECTURES, Seq2SeqConfig, seq2seq_config_from_hf
from model_lib.encdec.loading import load_seq2seq, seq2seq_architecture
from model_lib.encdec.model import Seq2SeqLM

__all__ = ["SEQ2SEQ_ARCHITECTURES", "Seq2SeqConfig", "Seq2SeqLM", "load_seq2seq", "seq2seq_architecture",
           "seq2seq_config_from_hf"]
