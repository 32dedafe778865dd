"""Pieces shared by the hand-written torch references of remote-code families (reference `own`).

Each such family (`tests/deci_reference.py`, `tests/grok_reference.py`, `tests/arctic_reference.py`)
writes a tiny checkpoint in the remote layout and returns a torch module with `forward(ids).logits`
and greedy `generate`, as transformers' models have. The math here is the textbook form the
remote modeling files share: rotate-half rotary with a base, GQA softmax attention with an optional
soft-cap of the scaled logits, and float32 RMSNorm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tests.tiny_models import VOCAB, build_tokenizer


class GreedyReference(nn.Module):
    """`generate` of transformers, greedy and unbatched, over the module's own `forward(ids).logits`."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, **_: Any) -> torch.Tensor:
        """Greedy decoding of one prompt, stopping after an EOS token (transformers' `generate`)."""
        assert not do_sample and input_ids.shape[0] == 1
        eos = self.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for _ in range(max_new_tokens):
            token = self(input_ids).logits[0, -1].argmax()
            input_ids = torch.cat([input_ids, token.view(1, 1)], dim=1)
            if int(token) in eos:
                break
        return input_ids


class RMSNorm(nn.Module):
    """x / rms(x) in float32, times `weight_name` (Grok's norms call it `scale`)."""

    def __init__(self, hidden: int, eps: float, weight_name: str = "weight"):
        super().__init__()
        self.eps, self.weight_name = eps, weight_name
        setattr(self, weight_name, nn.Parameter(torch.ones(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (getattr(self, self.weight_name) * x32).to(x.dtype)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary of `x [B, H, T, D]` at positions 0..T-1."""
    dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    half = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), dim=-1)
    return x * emb.cos() + half * emb.sin()


class CausalSelfAttention(nn.Module):
    """q/k/v/o projections without biases, rotary, causal GQA softmax over `softcap(scale * q.k)`."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, *, scale: float, theta: float,
                 softcap: float | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.scale, self.theta, self.softcap = scale, theta, softcap
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        logits = (q @ k.transpose(2, 3)).float() * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        logits = logits + torch.full((length, length), float("-inf")).triu(1)
        out = torch.softmax(logits, dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` under the remote file's own module names."""

    def __init__(self, hidden: int, inner: int, act: nn.Module, names: tuple[str, str, str]):
        super().__init__()
        self.act, self.names = act, names
        for name, (i, o) in zip(names, ((hidden, inner), (hidden, inner), (inner, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


def initialise(model: nn.Module, std: float) -> None:
    """Random weights everywhere (norms around 1), so that every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * std)


def write_remote_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """config.json as given, the tensors as safetensors, and the tiny tokenizer when the vocabulary fits."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if config["vocab_size"] == VOCAB:
        build_tokenizer().save_pretrained(folder)
