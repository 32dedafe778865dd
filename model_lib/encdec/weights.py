"""Checkpoint tensor names <-> our parameter paths for the encoder-decoders (`model.py`).

BART and MBart load by identity. FSMT names its head `model.decoder.output_projection`, Whisper `proj_out`
(its convolutions `model.encoder.conv1` / `conv2` load by identity: `weight [out, in, K]` is our kernel's
reverse, `layers/conv.py`). T5 / MT5 nest
each sub-layer in `block.N.layer.I` (I = 0 self-attention, 1 cross attention in the decoder, then the
feed-forward) and keep one relative-bias table in block 0 of each stack; the tables below map those onto
BART's layout and back (the way back names PEFT's modules).
"""

from __future__ import annotations

import re
from typing import Any

from model_lib.encdec.config import SEQ2SEQ_ARCHITECTURES
from model_lib.registry import Family
from model_lib.weight_map import WeightMap

# (HF pattern, our path) per kind, tried in order; None drops the tensor (tied copies, unused buffers).
_T5 = [
    (r"shared\.(.*)", r"model.shared.\1"),
    (r"(encoder|decoder)\.embed_tokens\.weight", None),  # copies of `shared`
    (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight", None),  # unused by transformers
    (r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     r"model.\1.relative_attention_bias"),
    (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.(.*)", r"model.\1.layers.\2.self_attn.\3"),
    (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.(.*)", r"model.\1.layers.\2.self_attn_layer_norm.\3"),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(.*)", r"model.decoder.layers.\1.encoder_attn.\2"),
    (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.(.*)", r"model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(.*)", r"model.encoder.layers.\1.\2"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.(.*)", r"model.encoder.layers.\1.final_layer_norm.\2"),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(.*)", r"model.decoder.layers.\1.\2"),
    (r"decoder\.block\.(\d+)\.layer\.2\.layer_norm\.(.*)", r"model.decoder.layers.\1.final_layer_norm.\2"),
    (r"(encoder|decoder)\.final_layer_norm\.(.*)", r"model.\1.layer_norm.\2"),
    (r"lm_head\.(.*)", r"lm_head.\1"),
]
_FSMT = [(r"model\.decoder\.output_projection\.(.*)", r"lm_head.\1")]
_WHISPER = [(r"proj_out\.(.*)", r"lm_head.\1")]
_NAMES = {"t5": _T5, "fsmt": _FSMT, "whisper": _WHISPER, "bart": []}

# (HF module, our module) per kind: what PEFT names our linear layers (`WeightMap.renames` patterns).
_T5_MODULES = tuple(
    [(f"{stack}.block.{{i}}.layer.0.SelfAttention.{p}", f"model.{stack}.layers.{{i}}.self_attn.{p}")
     for stack in ("encoder", "decoder") for p in "qkvo"]
    + [(f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}", f"model.decoder.layers.{{i}}.encoder_attn.{p}") for p in "qkvo"]
    + [(f"{stack}.block.{{i}}.layer.{index}.DenseReluDense.{p}", f"model.{stack}.layers.{{i}}.{p}")
       for stack, index in (("encoder", 1), ("decoder", 2)) for p in ("wi", "wi_0", "wi_1", "wo")]
)
_MODULES = {"t5": _T5_MODULES, "fsmt": (("model.decoder.output_projection", "lm_head"),),
            "whisper": (("proj_out", "lm_head"),), "bart": ()}


def _rewrite(table: list[tuple[str, str | None]], name: str) -> str | None:
    for pattern, target in table:
        match = re.fullmatch(pattern, name)
        if match:
            return None if target is None else match.expand(target)
    return name


def our_name(kind: str, name: str) -> str | None:
    """Our parameter path for an HF tensor name (None: a tensor we skip); linear weights become kernels
    where `linear_modules` names the module."""
    return _rewrite(_NAMES[kind], name)


def _not_decoder_only(hf: Any, architecture: str) -> Any:
    raise ValueError(f"{architecture} is an encoder-decoder: load it with model_lib.encdec.load_seq2seq "
                     "(serving.LLM and train do)")


def seq2seq_family(architecture: str) -> Family | None:
    """The registry's view of an encoder-decoder: its PEFT module names (None: not one of ours)."""
    kind = SEQ2SEQ_ARCHITECTURES.get(architecture)
    if kind is None:
        return None
    return Family(architecture, _not_decoder_only, WeightMap(renames=_MODULES[kind]), quirks="encoder-decoder")
