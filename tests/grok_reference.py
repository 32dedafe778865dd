"""Tiny Grok-1 checkpoints in the remote-code layout, and their torch reference.

transformers has no Grok-1 class. The reference is the forward of hpcai-tech/grok-1's
`modeling_grok1.py` (`Grok1ModelForCausalLM`, the PyTorch port of xai-org/grok-1), read in
the copy at tenstorrent/tt-metal `models/experimental/grok/reference/model.py` (commit
390dce043ad4b7bee60dde81cce8d65c5c6d3780), written out again here: embeddings times
`embedding_multiplier_scale`; per layer x + post_attn_norm(attn(pre_attn_norm(x))) and
x + post_moe_norm(moe(pre_moe_norm(x))); attention logits `q.k * attn_output_multiplier`
soft-capped by `max_attn_value * tanh(. / max_attn_value)`, rotary base 10000; the MoE a
softmax over the `gate` logits, top-k, unrenormalised weights, experts
`linear_1(gelu(linear(x)) * linear_v(x))`; logits `lm_head(norm(x)) * output_multiplier_scale`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from tests.own_reference import CausalSelfAttention, GatedMLP, GreedyReference, RMSNorm, initialise, write_remote_checkpoint
from tests.tiny_models import TinyCase

ARCHITECTURE = "Grok1ModelForCausalLM"


class GrokMoE(nn.Module):
    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(hidden, inner, nn.GELU(), ("linear", "linear_v", "linear_1")) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (weights * (chosen == e)).sum(-1, keepdim=True).to(x.dtype)  # 0 where e is not chosen
            out = out + expert(x) * weight
        return out


class GrokLayer(nn.Module):
    def __init__(self, c: transformers.PretrainedConfig):
        super().__init__()
        self.attn = CausalSelfAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                        scale=c.attn_output_multiplier, theta=10000.0, softcap=c.max_attn_value)
        self.moe_block = GrokMoE(c.hidden_size, c.intermediate_size, c.num_experts, c.num_experts_per_tok)
        for name in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            setattr(self, name, RMSNorm(c.hidden_size, c.rms_norm_eps, weight_name="scale"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x)))
        return x + self.post_moe_norm(self.moe_block(self.pre_moe_norm(x)))


class GrokReference(GreedyReference):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = transformers.PretrainedConfig.from_dict(dict(config))
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(GrokLayer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, weight_name="scale")
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        x = self.model.embed_tokens(input_ids) * self.config.embedding_multiplier_scale
        for layer in self.model.layers:
            x = layer(x)
        logits = self.lm_head(self.model.norm(x)) * self.config.output_multiplier_scale
        return SimpleNamespace(logits=logits.float())


def grok_config(case: TinyCase) -> dict:
    """config.json of a Grok-1 checkpoint: the published file's keys at the case's sizes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "grok-1",
        "auto_map": {
            "AutoConfig": "configuration_grok1.Grok1Config",
            "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM",
        },
        "num_key_value_heads": 2,
        "attn_output_multiplier": 0.25,
        "embedding_multiplier_scale": 3.0,
        "output_multiplier_scale": 0.5,
        "max_attn_value": 2.0,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        "num_experts_per_tok": 2,
        "num_experts": 4,
        "router_aux_loss_coef": 0.001,
        "torch_dtype": "float32",
        **case.dims,
        **case.overrides,
    }


def build_grok_checkpoint(case: TinyCase, folder: Path) -> GrokReference:
    """Write the case as a Grok-1 checkpoint (config.json, safetensors, tokenizer); return its reference."""
    config = grok_config(case)
    torch.manual_seed(0)
    model = GrokReference(config).float().eval()
    initialise(model, std=0.1)
    with torch.no_grad():  # decisive routing: float rounding never decides a top-k choice
        for layer in model.model.layers:
            layer.moe_block.gate.weight.mul_(5.0)
    tensors = model.state_dict()
    if config["tie_word_embeddings"]:
        del tensors["lm_head.weight"]
    write_remote_checkpoint(folder, tensors, config)
    return model
