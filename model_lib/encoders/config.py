"""`EncoderConfig`: the fields of a BERT-style encoder checkpoint, normalised from its HF config.

BERT, RoBERTa and XLM-RoBERTa share one post-LN encoder; they differ in data only: RoBERTa's
learned positions start after its padding index (`position_offset = pad_token_id + 1`) and its
classification head sits on the first token's final hidden state (`head="roberta"`), where
BERT's classifier reads the tanh pooler (`head="bert"`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model_lib.layers.activations import ACTIVATIONS

ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass(frozen=True)
class EncoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0  # learned position of a sequence's first token (RoBERTa: pad_token_id + 1)
    head: str | None = None  # None: bare encoder; "bert": pooler + classifier; "roberta": dense-tanh-out_proj on CLS
    has_pooler: bool = True  # a bare BertModel's `pooler` (stored, read by BERT's classifier)
    num_labels: int = 0
    problem_type: str | None = None
    id2label: tuple[str, ...] = ()
    initializer_range: float = 0.02
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """The longest input the learned positions cover."""
        return self.max_position_embeddings - self.position_offset

    def replace(self, **changes: Any) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)


# architecture -> (classification head, whether the encoder keeps its pooler)
HEADS: dict[str, tuple[str | None, bool]] = {
    "BertModel": (None, True),
    "RobertaModel": (None, True),
    "XLMRobertaModel": (None, True),
    "BertForSequenceClassification": ("bert", True),
    "RobertaForSequenceClassification": ("roberta", False),
    "XLMRobertaForSequenceClassification": ("roberta", False),
}


def encoder_config_from_hf(hf: Any, architecture: str) -> EncoderConfig:
    """`EncoderConfig` of a transformers Bert/Roberta/XLMRoberta config."""
    if hf.model_type not in ENCODER_MODEL_TYPES:
        raise ValueError(f"{architecture} with model_type {hf.model_type!r}: expected one of {ENCODER_MODEL_TYPES}")
    kind = getattr(hf, "position_embedding_type", None) or "absolute"
    if kind != "absolute":
        raise ValueError(f"position_embedding_type {kind!r} is not supported (absolute learned positions only)")
    head, has_pooler = HEADS[architecture]
    roberta = hf.model_type != "bert"
    pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    labels = getattr(hf, "id2label", None) or {}
    return EncoderConfig(
        architecture=architecture,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        hidden_act=hf.hidden_act,
        layer_norm_eps=hf.layer_norm_eps,
        pad_token_id=pad,
        position_offset=pad + 1 if roberta else 0,
        head=head,
        has_pooler=has_pooler,
        num_labels=hf.num_labels if head else 0,
        problem_type=getattr(hf, "problem_type", None),
        id2label=tuple(str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(hf.num_labels)) if head else (),
        initializer_range=getattr(hf, "initializer_range", 0.02),
    )
