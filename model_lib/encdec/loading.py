"""Load an encoder-decoder checkpoint folder (config.json + safetensors) into a `Seq2SeqLM`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import nnx
from safetensors import safe_open

from model_lib.checkpoint import (CheckpointError, abstract_params, architecture_in, checkpoint_files, read_hf_config,
                                  resolve_dtype)
from model_lib.encdec.config import SEQ2SEQ_ARCHITECTURES, Seq2SeqConfig, seq2seq_config_from_hf
from model_lib.encdec.model import Seq2SeqLM
from model_lib.encdec.weights import our_name
from model_lib.encoders.loading import load_by_name

HEAD = "lm_head.kernel"


def seq2seq_architecture(path: str | Path) -> str | None:
    """The checkpoint's architecture if it is an encoder-decoder we serve (else None)."""
    return architecture_in(path, SEQ2SEQ_ARCHITECTURES)


def _has_head(path: Path, kind: str) -> bool:
    """Whether the checkpoint stores an output head of its own (transformers then does not tie it)."""
    for file in checkpoint_files(path):
        with safe_open(file, framework="numpy") as f:
            if any(our_name(kind, name) == "lm_head.weight" for name in f.keys()):
                return True
    return False


def load_seq2seq(path: str | Path, *, dtype: Any = None) -> Seq2SeqLM:
    """`dtype`: float32, bfloat16 or float16 (default: the checkpoint's own)."""
    path = Path(path)
    raw, architecture, hf = read_hf_config(path, SEQ2SEQ_ARCHITECTURES, "an encoder-decoder")
    config = seq2seq_config_from_hf(hf, architecture, path).replace(dtype=resolve_dtype(dtype, raw))
    if _has_head(path, config.kind):
        config = config.replace(tie_output=False)
    elif not config.tie_output:
        raise CheckpointError(f"checkpoint {path} has no output head and its config does not tie it")
    abstract = nnx.eval_shape(lambda: Seq2SeqLM(config, rngs=nnx.Rngs(0)))
    expected = abstract_params(abstract)
    # transformers starts a missing final_logits_bias at zeros (`_keys_to_ignore_on_load_missing`).
    return load_by_name(path, abstract, lambda name: tensor_key(config, expected, name), architecture,
                        optional=("final_logits_bias",))


def tensor_key(config: Seq2SeqConfig, expected: dict[str, Any], name: str) -> str | None:
    """Our parameter path for the checkpoint tensor `name` (None: skipped); linear weights are kernels."""
    ours = our_name(config.kind, name)
    if ours is None:
        return None
    module, _, leaf = ours.rpartition(".")
    return f"{module}.kernel" if leaf == "weight" and f"{module}.kernel" in expected else ours
