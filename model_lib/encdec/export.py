"""Write a `Seq2SeqLM` as a Hugging Face checkpoint: the tensors of the checkpoint it was loaded from,
under the same names, with the model's current values (after full fine-tuning or a LoRA merge)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model_lib.checkpoint import abstract_params, checkpoint_files
from model_lib.encdec.loading import tensor_key
from model_lib.encdec.model import Seq2SeqLM

CONFIG_FILES = ("config.json", "generation_config.json")


def save_seq2seq(model: Seq2SeqLM, source: str | Path, target: str | Path) -> None:
    """`target`/model.safetensors with every tensor of `source`'s checkpoint (tied copies included) taken
    from `model`, and `source`'s config files. The model's dtype is kept."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    params = abstract_params(model)
    tensors = {}
    for file in checkpoint_files(source):
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
        for name in names:
            key = tensor_key(model.config, params, name)
            if key is None and name.endswith("embed_tokens.weight") and model.model.shared is not None:
                key = "model.shared.weight"  # a tied copy of the shared table
            if key is None:
                continue
            value = np.asarray(jax.device_get(params[key].get_value()))
            tensors[name] = np.ascontiguousarray(value.T if key.endswith(".kernel") else value)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
