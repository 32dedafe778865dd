"""Tiny Snowflake Arctic checkpoints in the remote-code layout, and their torch reference.

transformers has no Arctic class. The reference is the forward of `modeling_arctic.py`
(`ArcticForCausalLM` of Snowflake/snowflake-arctic-instruct, its local non-DeepSpeed MoE
path), written out again here: Llama attention and RMSNorms; layer i is MoE when
(i + 1) % moe_layer_frequency == 0 (softmax router, top-k, renormalised, experts
`w2(silu(w1(x)) * w3(x))`), else a dense MLP `block_sparse_moe.mlp`; with
`parallel_attn_mlp_res`, an MoE layer computes h = x + attn(input_layernorm(x)) and returns
h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x)), the residual MLP
of width hidden_size (`ArcticDecoderLayer.forward`, `ArcticMLP(is_residual_mlp=True)`).
Source read: the model hub's remote code `modeling_arctic.py`, in a public Gaudi (optimum-habana
style) copy whose `ArcticMLP` / `ArcticMoE._moe_foreward` / `ArcticDecoderLayer.forward` keep the
original math; the residual order agrees with vLLM's `vllm/model_executor/models/arctic.py`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from tests.own_reference import CausalSelfAttention, GatedMLP, GreedyReference, RMSNorm, initialise, write_remote_checkpoint
from tests.tiny_models import TinyCase

ARCHITECTURE = "ArcticForCausalLM"
W1_W3_W2 = ("w1", "w3", "w2")


class ArcticMoE(nn.Module):
    """`block_sparse_moe`: the dense `mlp`, or `gate` + `experts` on MoE layers."""

    def __init__(self, c: transformers.PretrainedConfig, is_moe: bool):
        super().__init__()
        self.is_moe, self.top_k = is_moe, c.num_experts_per_tok
        if is_moe:
            self.gate = nn.Linear(c.hidden_size, c.num_local_experts, bias=False)
            self.experts = nn.ModuleList(
                GatedMLP(c.hidden_size, c.intermediate_size, nn.SiLU(), W1_W3_W2) for _ in range(c.num_local_experts)
            )
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, nn.SiLU(), W1_W3_W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_moe:
            return self.mlp(x)
        weights, chosen = torch.topk(torch.softmax(self.gate(x).float(), dim=-1), self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * (weights * (chosen == e)).sum(-1, keepdim=True)
        return out


class ArcticLayer(nn.Module):
    def __init__(self, c: transformers.PretrainedConfig, index: int):
        super().__init__()
        is_moe = (index + 1) % c.moe_layer_frequency == 0
        self.self_attn = CausalSelfAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                             scale=(c.hidden_size // c.num_attention_heads) ** -0.5, theta=c.rope_theta)
        self.block_sparse_moe = ArcticMoE(c, is_moe)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.parallel_attn_mlp_res = c.parallel_attn_mlp_res and is_moe
        if self.parallel_attn_mlp_res:
            self.residual_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
            self.residual_mlp = GatedMLP(c.hidden_size, c.hidden_size, nn.SiLU(), W1_W3_W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        if self.parallel_attn_mlp_res:
            residual = h + self.residual_mlp(self.residual_layernorm(h))
            return residual + self.block_sparse_moe(self.post_attention_layernorm(x))
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class ArcticReference(GreedyReference):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = transformers.PretrainedConfig.from_dict(dict(config))
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(ArcticLayer(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return SimpleNamespace(logits=self.lm_head(self.model.norm(x)).float())


def arctic_config(case: TinyCase) -> dict:
    """config.json of an Arctic checkpoint: the published file's keys at the case's sizes."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "arctic",
        "auto_map": {"AutoConfig": "configuration_arctic.ArcticConfig",
                     "AutoModelForCausalLM": "modeling_arctic.ArcticForCausalLM"},
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50_000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_layer_frequency": 2,
        "parallel_attn_mlp_res": True,
        "moe_train_capacity_factor": 1,
        "moe_eval_capacity_factor": 1,
        "enable_expert_tensor_parallelism": False,
        "moe_min_capacity": 0,
        "moe_token_dropping": True,
        "quantization": None,
        "router_aux_loss_coef": 0.001,
        "torch_dtype": "float32",
        **case.dims,
        **case.overrides,
    }


def build_arctic_checkpoint(case: TinyCase, folder: Path) -> ArcticReference:
    """Write the case as an Arctic checkpoint (config.json, safetensors, tokenizer); return its reference."""
    config = arctic_config(case)
    torch.manual_seed(0)
    model = ArcticReference(config).float().eval()
    initialise(model, std=0.1)
    with torch.no_grad():  # decisive routing: float rounding never decides a top-k choice
        for layer in model.model.layers:
            if layer.block_sparse_moe.is_moe:
                layer.block_sparse_moe.gate.weight.mul_(5.0)
    write_remote_checkpoint(folder, model.state_dict(), config)
    return model
