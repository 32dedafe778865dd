"""Pooling requests: `PoolingParams` and the outputs of `LLM.embed` / `classify` / `score` / `reward` /
`encode` (vLLM's names and shapes), and how a model's raw batch outputs become them.

A pooling model (`model_lib.encoders`) gives one raw array per input: an embedding model its pooled
hidden state `[E]`, a classifier its class logits `[L]`, a reward model its per-token value-head outputs
`[T, L]`. The task turns it into the request's output on the host:
- embed: the first `dimensions` values (Matryoshka), L2-normalised unless the model or `normalize` says not;
- classify: probabilities: softmax over the labels, sigmoid for one label or multi-label problems;
- score: a cross-encoder's (classifier with one label) sigmoid probability of the pair, or the cosine
  similarity of two embeddings (computed by the front end from two embed outputs);
- reward: the per-token outputs (a process reward model's two labels as softmax probabilities);
- encode: the model's own task output (what `/pooling` returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

POOLING_TASKS = ("embed", "classify", "score", "reward", "encode")
# model task -> the request tasks it serves
SERVED_TASKS = {"embed": ("embed", "score", "encode"), "classify": ("classify", "score", "encode"),
                "reward": ("reward", "encode")}
MAX_DIMENSIONS = 1 << 16  # bound on `dimensions` before the model's own check


@dataclass(frozen=True)
class PoolingParams:
    """What a pooling request asks for. `token_type_ids` (one per prompt token) carry a cross-encoder
    pair's segments; the front ends set them from the tokenizer."""

    task: str = "encode"
    dimensions: int | None = None  # embed: truncate to this many (Matryoshka models only)
    normalize: bool | None = None  # embed: None = the model's own (sentence-transformers' Normalize, else on)
    token_type_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"unknown pooling task {self.task!r}; one of {POOLING_TASKS}")
        if self.dimensions is not None and not (isinstance(self.dimensions, int) and 1 <= self.dimensions <= MAX_DIMENSIONS):
            raise ValueError(f"dimensions must be an integer in [1, {MAX_DIMENSIONS}], got {self.dimensions!r}")
        if self.dimensions is not None and self.task not in ("embed", "encode"):
            raise ValueError("dimensions applies to embeddings only")


@dataclass
class PoolingOutput:
    data: np.ndarray  # float32: [E] (embed), [L] (classify), [T, L] (reward)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    """One pooling request's result (vLLM's PoolingRequestOutput and its typed kinds)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: Any = None  # EmbeddingOutput | ClassificationOutput | ScoringOutput | PoolingOutput
    prompt: str | None = None
    finished: bool = True  # a pooling request is done in one step
    error: str | None = None  # why the engine failed this request


# vLLM's typed names for the same object
EmbeddingRequestOutput = ClassificationRequestOutput = ScoringRequestOutput = PoolingRequestOutput


@dataclass
class PoolingTask:
    """What a model's raw outputs need to become a task's output."""

    model_task: str  # "embed", "classify" or "reward"
    normalize: bool = True
    num_labels: int = 0
    multi_label: bool = False


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def class_probs(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """vLLM's classify activation: sigmoid for one label or a multi-label problem, else softmax."""
    return _sigmoid(logits) if multi_label or logits.shape[-1] == 1 else _softmax(logits)


def embedding(pooled: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    vector = pooled[:dimensions] if dimensions is not None else pooled
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector


def task_output(task: PoolingTask, params: PoolingParams, raw: np.ndarray) -> Any:
    """The request's output from its row of raw model outputs (see the module docstring)."""
    raw = np.asarray(raw, np.float32)
    kind = params.task if params.task != "encode" else task.model_task
    if task.model_task == "embed":
        normalize = task.normalize if params.normalize is None else params.normalize
        vector = embedding(raw, params.dimensions, normalize)
        return PoolingOutput(vector) if params.task == "encode" else EmbeddingOutput(vector.tolist())
    if task.model_task == "classify":
        probs = class_probs(raw, task.multi_label)
        if kind == "score":
            return ScoringOutput(float(probs[0]))
        return PoolingOutput(probs) if params.task == "encode" else ClassificationOutput(probs.tolist())
    # reward: a process reward model's two labels are reported as probabilities, a reward as it is
    data = _softmax(raw) if task.num_labels == 2 else raw
    return PoolingOutput(data)


def cosine(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def score_pairs(data_1: str | list[str], data_2: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one first text against every second text (1 -> N), or pairwise (N -> N)."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if not first or not second:
        raise ValueError("score needs at least one text on each side")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"score pairs one text with N texts or N with N; got {len(first)} and {len(second)}")
    return list(zip(first, second))


PoolingInput = tuple[str | None, list[int], PoolingParams]  # (text, token ids, params) of one request


@dataclass
class ScorePlan:
    """The requests that score text pairs, and how their outputs combine into one score per pair.

    A cross-encoder (a classifier with one label) reads each pair as one input, the tokenizer's pair
    encoding with its token types, and scores it with its sigmoid probability. An embedding model
    embeds each distinct text once; a pair's score is the cosine similarity of its two embeddings.
    """

    inputs: list[PoolingInput]
    embedded_pairs: list[tuple[int, int]] | None  # embedding models: each pair's two input indices

    def scores(self, outputs: list[PoolingRequestOutput]) -> list[PoolingRequestOutput]:
        if self.embedded_pairs is None:
            return outputs
        results = []
        for i, (first, second) in enumerate(self.embedded_pairs):
            a, b = outputs[first], outputs[second]
            error = a.error or b.error
            score = None if error else ScoringOutput(cosine(a.outputs.embedding, b.outputs.embedding))
            results.append(PoolingRequestOutput(f"score-{i}", a.prompt_token_ids + b.prompt_token_ids, score, error=error))
        return results


def plan_scores(model_task: str, num_labels: int, type_vocab_size: int, tokenizer: Any,
                data_1: str | list[str], data_2: str | list[str]) -> ScorePlan:
    """The `ScorePlan` of `score(data_1, data_2)` on a model of `model_task` (ValueError if it cannot score)."""
    pairs = score_pairs(data_1, data_2)
    if model_task not in ("embed", "classify"):
        raise ValueError(f"score needs an embedding model or a cross-encoder; this model serves {model_task}")
    if tokenizer is None:
        raise ValueError("scoring texts needs the model's tokenizer")
    for text in (t for pair in pairs for t in pair):
        if not isinstance(text, str):
            raise ValueError("score takes texts")
    if model_task == "classify":
        if num_labels != 1:
            raise ValueError(f"score needs a cross-encoder with one label; this classifier has {num_labels}: "
                             "use classify")
        inputs = []
        for first, second in pairs:
            encoded = tokenizer(first, second)
            types = encoded.get("token_type_ids") if type_vocab_size > 1 else None
            params = PoolingParams("score", token_type_ids=None if types is None else tuple(types))
            inputs.append((None, list(encoded["input_ids"]), params))
        return ScorePlan(inputs, None)
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    index = {text: i for i, text in enumerate(texts)}
    inputs = [(text, tokenizer.encode(text), PoolingParams("embed")) for text in texts]
    return ScorePlan(inputs, [(index[a], index[b]) for a, b in pairs])
