"""Pooling: per-token hidden states `[B, T, E]` -> one vector per row, and how a checkpoint asks for it.

Kinds (vLLM's names): `cls` (first token), `mean` (over the row's real tokens), `last` (its last real
token). A sentence-transformers checkpoint says which in `modules.json` -> `<Pooling dir>/config.json`
(`pooling_mode_cls_token`, `pooling_mode_mean_tokens`, `pooling_mode_lasttoken`) and whether it
L2-normalises (a `sentence_transformers.models.Normalize` module); without those files the model's
default applies, normalised as vLLM's embeddings are. Matryoshka checkpoints (`is_matryoshka` or
`matryoshka_dimensions` in config.json) may be truncated to fewer `dimensions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

POOLING_KINDS = ("cls", "mean", "last")
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


@dataclass(frozen=True)
class PoolingSpec:
    kind: str = "cls"
    normalize: bool = True
    matryoshka: bool = False  # any `dimensions` up to the hidden size may be asked for
    matryoshka_dimensions: tuple[int, ...] = ()  # where the checkpoint lists them: only these
    max_seq_length: int | None = None  # sentence-transformers' truncation length, if it sets one

    def __post_init__(self) -> None:
        if self.kind not in POOLING_KINDS:
            raise ValueError(f"pooling kind {self.kind!r}; supported: {POOLING_KINDS}")

    def check_dimensions(self, dimensions: int | None, hidden_size: int) -> None:
        """ValueError unless `dimensions` (None: all) is a truncation this model allows."""
        if dimensions is None:
            return
        if not self.matryoshka:
            raise ValueError("this model does not support matryoshka representations: 'dimensions' cannot be set")
        allowed = self.matryoshka_dimensions or tuple(range(1, hidden_size + 1))
        if dimensions not in allowed:
            listed = ", ".join(map(str, self.matryoshka_dimensions)) if self.matryoshka_dimensions else f"1..{hidden_size}"
            raise ValueError(f"dimensions={dimensions} is not supported by this model; allowed: {listed}")


def pool(hidden: jax.Array, attention_mask: jax.Array, kind: str) -> jax.Array:
    """`[B, T, E]` hidden states and `[B, T]` mask (1 = token, right padding) -> float32 `[B, E]`."""
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask.astype(jnp.float32)
    if kind == "cls":
        return hidden[:, 0]
    if kind == "mean":
        return jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    if kind == "last":
        last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling kind {kind!r}; supported: {POOLING_KINDS}")


def read_pooling_spec(path: str | Path, default_kind: str) -> PoolingSpec:
    """The checkpoint's pooling: sentence-transformers files where present, else `default_kind`, normalised."""
    path = Path(path)
    kind, normalize, max_len = default_kind, True, None
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        types = [m.get("type", "") for m in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for module in modules:
            if module.get("type", "").endswith(".Pooling"):
                settings = json.loads((path / module.get("path", "") / "config.json").read_text())
                modes = [ours for name, ours in _ST_MODES.items() if settings.get(name)]
                if len(modes) != 1:
                    raise ValueError(f"{path}: pooling modes {modes or 'none'} in {module.get('path')}; supported: "
                                     f"exactly one of {sorted(_ST_MODES)}")
                kind = modes[0]
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = json.loads(st_config.read_text()).get("max_seq_length")
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    dims = tuple(int(d) for d in raw.get("matryoshka_dimensions") or ())
    return PoolingSpec(kind, normalize, bool(raw.get("is_matryoshka") or dims), dims, max_len)
