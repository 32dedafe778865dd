"""Tiny DeciLM / Nemotron-NAS checkpoints in the remote-code layout, and their torch reference.

transformers has no DeciLM class (only the checkpoints' `modeling_decilm.py`), so the
reference here is that file's forward assembled from transformers' own Llama modules,
one `LlamaAttention` / `LlamaMLP` per layer with that layer's kv heads and
intermediate size, plus `nn.Linear` for the `replace_with_linear` sublayers.

A case's `block_configs` override is compact, one `(attention, ffn)` pair per layer:
attention is a GQA group size (`n_heads_in_group`), "none" (no_op) or "linear"
(replace_with_linear); ffn is an `ffn_mult`, "none" or "linear". Without it the
checkpoint is a `LlamaForCausalLM` rewritten as a DeciLM whose every block is
standard, and that Llama is the reference.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from tests.own_reference import GreedyReference, write_remote_checkpoint
from tests.tiny_models import TinyCase

ARCHITECTURE = "DeciLMForCausalLM"


def block_config(attention: Any, ffn: Any) -> dict[str, Any]:
    """One `block_configs` entry as the published Nemotron configs spell it out."""
    return {
        "attention": {
            "n_heads_in_group": None if attention in ("none", "linear") else attention,
            "no_op": attention == "none",
            "replace_with_linear": attention == "linear",
            "sparsify": None,
            "num_sink_tokens": None,
            "use_prefill_window_in_sink_attention": False,
            "unshifted_sink": False,
            "window_length": None,
        },
        "ffn": {
            "ffn_mult": None if ffn in ("none", "linear") else ffn,
            "no_op": ffn == "none",
            "replace_with_linear": ffn == "linear",
            "sparsify": None,
        },
    }


def remote_config(llama: transformers.LlamaConfig, blocks: list[dict[str, Any]], architecture: str = ARCHITECTURE) -> dict[str, Any]:
    """config.json of a DeciLM checkpoint (Llama fields, legacy rotary keys, per-layer blocks)."""
    rope = dict(llama.rope_parameters)
    theta = rope.pop("rope_theta")
    return {
        "architectures": [architecture],
        "model_type": "nemotron-nas",
        "auto_map": {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        "vocab_size": llama.vocab_size,
        "hidden_size": llama.hidden_size,
        "num_hidden_layers": llama.num_hidden_layers,
        "num_attention_heads": llama.num_attention_heads,
        "num_key_value_heads": None,
        "intermediate_size": None,
        "hidden_act": llama.hidden_act,
        "max_position_embeddings": llama.max_position_embeddings,
        "rms_norm_eps": llama.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "attention_bias": llama.attention_bias,
        "mlp_bias": llama.mlp_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": llama.tie_word_embeddings,
        "initializer_range": llama.initializer_range,
        "bos_token_id": llama.bos_token_id,
        "eos_token_id": llama.eos_token_id,
        "pad_token_id": llama.pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
        "block_configs": blocks,
    }


class _LinearSublayer(nn.Module):
    """`replace_with_linear`: one bias-free hidden->hidden projection under the given name."""

    def __init__(self, name: str, hidden: int):
        super().__init__()
        self.name = name
        setattr(self, name, nn.Linear(hidden, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


class DeciLayer(nn.Module):
    """`DeciLMDecoderLayer`: each sublayer present, a linear projection, or absent with its norm."""

    def __init__(self, config: transformers.LlamaConfig, index: int, attention: Any, ffn: Any):
        super().__init__()
        self.attention, self.ffn = attention, ffn
        hidden, eps = config.hidden_size, config.rms_norm_eps
        if attention != "none":
            self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
            if attention == "linear":
                self.self_attn = _LinearSublayer("linear_attn", hidden)
            else:
                layer_config = copy.deepcopy(config)
                layer_config.num_key_value_heads = config.num_attention_heads // attention
                self.self_attn = LlamaAttention(layer_config, index)
        if ffn != "none":
            self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
            if ffn == "linear":
                self.mlp = _LinearSublayer("linear_mlp", hidden)
            else:
                layer_config = copy.deepcopy(config)
                layer_config.intermediate_size = _intermediate_size(ffn, hidden)
                self.mlp = LlamaMLP(layer_config)

    def forward(self, x: torch.Tensor, position_embeddings, mask: torch.Tensor) -> torch.Tensor:
        if self.attention == "linear":
            x = x + self.self_attn(self.input_layernorm(x))
        elif self.attention != "none":
            x = x + self.self_attn(self.input_layernorm(x), position_embeddings, mask)[0]
        if self.ffn != "none":
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def _intermediate_size(ffn_mult: float, hidden: int) -> int:
    """`_ffn_mult_to_intermediate_size` of modeling_decilm.py, written out again for the reference."""
    size = int(2 * ffn_mult * hidden / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


class DeciReference(GreedyReference):
    """`DeciLMForCausalLM` forward on CPU; module names are the checkpoint's tensor names."""

    def __init__(self, config: transformers.LlamaConfig, layers: list[tuple[Any, Any]]):
        super().__init__()
        config._attn_implementation = "eager"
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DeciLayer(config, i, a, f) for i, (a, f) in enumerate(layers))
        self.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.model.rotary_emb = LlamaRotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        x = self.model.embed_tokens(input_ids)
        length = input_ids.shape[1]
        position_embeddings = self.model.rotary_emb(x, torch.arange(length)[None])
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        for layer in self.model.layers:
            x = layer(x, position_embeddings, mask)
        return SimpleNamespace(logits=self.lm_head(self.model.norm(x)))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def build_deci_checkpoint(case: TinyCase, folder: Path) -> nn.Module:
    """Write the case as a DeciLM checkpoint (config.json, safetensors, tokenizer); return its reference."""
    overrides = dict(case.overrides)
    layers = overrides.pop("block_configs", None)
    llama = getattr(transformers, case.config_class)(**{**case.dims, **overrides})
    torch.manual_seed(0)
    if layers is None:
        # Every block standard: the Llama itself, with the group size and ffn_mult that reproduce it.
        group = llama.num_attention_heads // llama.num_key_value_heads
        ffn_mult = 3 * llama.intermediate_size / (2 * llama.hidden_size)
        assert _intermediate_size(ffn_mult, llama.hidden_size) == llama.intermediate_size
        layers = [(group, ffn_mult)] * llama.num_hidden_layers
        model = transformers.LlamaForCausalLM(llama)
    else:
        model = DeciReference(llama, layers)
        for module in model.modules():  # transformers' Llama initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=llama.initializer_range)
    model = model.float().eval()
    _perturb(model)
    architecture = case.architecture or ARCHITECTURE
    write_deci_checkpoint(folder, model.state_dict(), llama, layers, architecture)
    model.config.architectures = [architecture]
    return model


def write_deci_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], llama: transformers.LlamaConfig, layers,
                          architecture: str = ARCHITECTURE) -> None:
    """config.json in the remote layout, the tensors as safetensors, and the tiny tokenizer."""
    tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
    write_remote_checkpoint(folder, tensors, remote_config(llama, [block_config(a, f) for a, f in layers], architecture))
