"""Pooling checkpoints (encoders, classifiers, reward models) -> a `PoolingModel`.

One table, architecture -> the task it serves. Encoder tensors load by identity onto the modules of
`bert.py` (their names are HF's): HF linear `weight [out, in]` is our `kernel [in, out]`; a checkpoint
saved from the bare encoder (`embeddings...`) loads into a classifier's base and back (`bert.` /
`roberta.` prefixes); legacy `LayerNorm.gamma` / `beta` are `weight` / `bias`; position-id buffers and
pre-training heads (`cls.`, `lm_head.`) are skipped. Missing, unexpected and wrongly shaped tensors
raise `CheckpointError` naming the tensor. Reward models load their decoder as the Qwen2 family does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.checkpoint import (CheckpointError, abstract_params, architecture_in, iter_tensors, load_params, read_hf_config,
                                  resolve_dtype)
from model_lib.encoders.bert import EncoderForSequenceClassification, EncoderModel
from model_lib.encoders.config import EncoderConfig, encoder_config_from_hf
from model_lib.encoders.pooling import PoolingSpec, pool, read_pooling_spec
from model_lib.encoders.reward import REWARD_LABELS, DecoderEmbedder, RewardModel

# architecture -> task: "embed" (pooled hidden states), "classify" (class logits; cross-encoder scores),
# "reward" (per-token value-head outputs)
POOLING_ARCHITECTURES: dict[str, str] = {
    "BertModel": "embed",
    "RobertaModel": "embed",
    "XLMRobertaModel": "embed",
    "BertForSequenceClassification": "classify",
    "RobertaForSequenceClassification": "classify",
    "XLMRobertaForSequenceClassification": "classify",
    "Qwen2ForRewardModel": "reward",
    "Qwen2ForProcessRewardModel": "reward",
}
_SKIPPED = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^(cls|lm_head)\.")


def pooling_architecture(path: str | Path) -> str | None:
    """The checkpoint's architecture if it is a pooling one (else None; GGUF files are generative)."""
    return architecture_in(path, POOLING_ARCHITECTURES)


@dataclass
class PoolingModel:
    """A loaded pooling checkpoint: the network, its task and what requests need to know."""

    architecture: str
    task: str
    net: nnx.Module
    spec: PoolingSpec
    max_tokens: int  # the longest input the model takes
    vocab_size: int
    hidden_size: int
    pad_token_id: int
    num_labels: int
    id2label: tuple[str, ...]
    type_vocab_size: int  # token types a pair input may use (1: none)
    multi_label: bool = False  # a classifier trained for multi-label problems (sigmoid per label)

    def outputs(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """The task's raw outputs of a right-padded `[B, T]` batch: float32 pooled `[B, E]` (embed), class
        logits `[B, L]` (classify), or per-token value-head outputs `[B, T, L]` (reward)."""
        return task_outputs(self.net, self.spec.kind, input_ids, attention_mask, token_type_ids)


def task_outputs(net: nnx.Module, kind: str, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array) -> jax.Array:
    if isinstance(net, RewardModel):
        return net.token_scores(net.hidden_states(input_ids, attention_mask))
    if isinstance(net, EncoderForSequenceClassification):
        return net.logits(net.base(input_ids, attention_mask, token_type_ids))
    return pool(net(input_ids, attention_mask, token_type_ids), attention_mask, kind)


def _encoder_key(name: str, prefix: str | None, expected: dict[str, Any]) -> str | None:
    """Our parameter path for an HF encoder tensor name (None: a tensor we skip)."""
    if _SKIPPED.search(name):
        return None
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    head, _, rest = name.partition(".")
    if prefix is None and head in ("bert", "roberta"):
        name = rest  # a classifier's checkpoint read as the bare encoder
    elif prefix is not None and head in ("embeddings", "encoder", "pooler"):
        name = f"{prefix}.{name}"  # a bare encoder's checkpoint read into a classifier
    module, _, leaf = name.rpartition(".")
    if leaf == "weight" and f"{module}.kernel" in expected:
        return f"{module}.kernel"
    if name.endswith("pooler.dense.weight") or name.endswith("pooler.dense.bias"):
        return name if name in expected else None  # a pooler the head does not read
    return name


def _load_encoder(path: Path, config: EncoderConfig) -> nnx.Module:
    cls = EncoderModel if config.head is None else EncoderForSequenceClassification
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    expected = abstract_params(abstract)
    prefix = None if config.head is None else abstract.base_name
    return load_by_name(path, abstract, lambda name: _encoder_key(name, prefix, expected), config.architecture)


def load_by_name(path: Path, abstract: nnx.Module, key_of: Callable[[str], str | None], architecture: str,
                 optional: Collection[str] = ()) -> nnx.Module:
    """Fill the abstract module from the checkpoint's tensors, each put at `key_of(its name)` (None: skipped;
    HF linear `weight [out, in]` -> our `kernel [in, out]`). Parameters named in `optional` keep their
    initial values when the checkpoint lacks them; any other missing, unexpected, repeated or wrongly
    shaped tensor raises `CheckpointError` naming it."""
    expected = abstract_params(abstract)
    values: dict[str, jax.Array] = {}
    for file, name, tensor in iter_tensors(path):
        key = key_of(name)
        if key is None:
            continue
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in {file} (no parameter {key!r} in {architecture})")
        array = tensor.T if key.endswith(".kernel") else tensor
        if key in values:
            raise CheckpointError(f"tensor {name!r} in {file} is a second copy of {key!r}")
        if tuple(array.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)[::-1] if key.endswith('.kernel') else tuple(expected[key].shape)}")
        values[key] = jnp.asarray(np.ascontiguousarray(array.astype(expected[key].get_value().dtype, copy=False)))
    missing = [k for k in expected if k not in values and k not in optional]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    graphdef, state = nnx.split(abstract)
    filled = []
    for p, v in nnx.to_flat_state(state):
        key = ".".join(map(str, p))
        value = values[key] if key in values else jnp.zeros(v.shape, v.get_value().dtype)
        filled.append((p, v.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_pooling_model(path: str | Path, *, dtype: Any = None) -> PoolingModel:
    """Load a pooling checkpoint folder (config.json + safetensors); `dtype` as `from_pretrained`'s."""
    from model_lib.families.llama import QWEN2

    path = Path(path)
    raw, architecture, hf = read_hf_config(path, POOLING_ARCHITECTURES, "a pooling model")
    name = resolve_dtype(dtype, raw)
    if architecture in REWARD_LABELS:
        config = QWEN2.config_from_hf(hf, architecture).replace(dtype=name)
        labels = REWARD_LABELS[architecture]
        abstract = nnx.eval_shape(lambda: RewardModel(config, labels, rngs=nnx.Rngs(0)))
        values = load_params(abstract, QWEN2, path, None)
        graphdef, state = nnx.split(abstract)
        net = nnx.merge(graphdef, nnx.from_flat_state(
            [(p, v.replace(value=values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)]))
        return PoolingModel(architecture, "reward", net, PoolingSpec("last", normalize=False),
                            config.max_position_embeddings, config.vocab_size, config.hidden_size,
                            hf.pad_token_id if hf.pad_token_id is not None else 0, labels, (), 1)
    config = encoder_config_from_hf(hf, architecture).replace(dtype=name)
    net = _load_encoder(path, config)
    return PoolingModel(architecture, POOLING_ARCHITECTURES[architecture], net, read_pooling_spec(path, "cls"),
                        config.max_tokens, config.vocab_size, config.hidden_size, config.pad_token_id,
                        config.num_labels, config.id2label, config.type_vocab_size,
                        config.problem_type == "multi_label_classification")


def decoder_pooling_model(lm: nnx.Module, max_tokens: int) -> PoolingModel:
    """An embedding `PoolingModel` over a loaded causal LM: its last real token's final hidden state,
    L2-normalised (vLLM's default for decoder embedders), sharing the LM's weights."""
    config = lm.config
    return PoolingModel(config.architecture, "embed", DecoderEmbedder(lm), PoolingSpec("last", normalize=True),
                        max_tokens, config.vocab_size, config.hidden_size, 0, 0, (), 1)
