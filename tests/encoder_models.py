"""Tiny pooling checkpoints built at test time: BERT-style encoders and classifiers (transformers classes),
and the Qwen2 reward models, whose remote modeling code transformers lacks (own torch reference below:
transformers' `Qwen2Model` plus the published `score` head)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from tests.tiny_models import VOCAB

ENCODER_DIMS = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    max_position_embeddings=64)
QWEN2_DIMS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LENGTHS = (12, 7, 3)  # one padded batch: right padding, as the tokenizers of these models pad


def perturb(model: nn.Module) -> None:
    """Random init leaves norms at 1 / 0 and biases at 0: perturb every parameter so each one matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def build_encoder(architecture: str, folder: Path, config_class: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**ENCODER_DIMS, **overrides})
    model = getattr(transformers, architecture)(config).float().eval()
    perturb(model)
    model.save_pretrained(folder)
    return model


class RewardReference(nn.Module):
    """The published Qwen2ForRewardModel / Qwen2ForProcessRewardModel: `score(model(ids))` per token."""

    def __init__(self, config: transformers.Qwen2Config, num_labels: int):
        super().__init__()
        self.model = transformers.Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


def build_reward(architecture: str, folder: Path) -> RewardReference:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**QWEN2_DIMS)
    model = RewardReference(config, 1 if architecture == "Qwen2ForRewardModel" else 2).float().eval()
    perturb(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config.architectures = [architecture]
    config.save_pretrained(folder)
    return model


def padded_inputs(seed: int = 0, lengths=LENGTHS, type_ids: bool = False):
    """Right-padded ids (real tokens >= 3, so never a pad id), mask and token types `[B, T]`."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.randint(3, VOCAB, n)
        mask[row, :n] = 1
        if type_ids:
            types[row, n // 2 : n] = 1
    return ids, mask, types


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_bert_tokenizer(folder: Path):
    """A WordPiece BERT tokenizer over exactly VOCAB ids (lower-case letters, digits, punctuation, a few
    words), written to `folder` with `save_pretrained`."""
    pieces = BERT_SPECIALS + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    pieces += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += ["the", "quick", "brown", "fox", "dog", "cat", "is", "an", "what", "capital", "of", "france", "paris"]
    pieces += [f"[unused{i}]" for i in range(VOCAB - len(pieces))]
    assert len(pieces) == VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.BertTokenizerFast(vocab={p: i for i, p in enumerate(pieces)})
    tokenizer.save_pretrained(folder)
    return tokenizer
