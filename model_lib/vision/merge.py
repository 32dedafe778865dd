"""Embeddings merged at placeholder positions: the one way encoder outputs enter the decoder.

Both batch shapes use the same form: `embeds [M, E]` rows and an `index` shaped like the
token ids (`[B, T]` dense, `[T]` ragged) naming, per token, the row that replaces its
token embedding, or -1 to keep it. The model gathers and selects; it never looks for
placeholder ids itself, so chunked prefill may feed any slice of an image's rows.

DeepStack (Qwen3-VL): `deepstack [K, M, E]` holds K more sets of the same rows; the decoder adds
set k to the output of its layer k at the indexed tokens (`add_to_layer_output`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass
class MergedEmbeddings:
    embeds: jax.Array  # [M, E]
    index: jax.Array  # like input_ids: row of `embeds`, or -1 for the token's own embedding
    deepstack: jax.Array | None = None  # [K, M, E] rows added after the first K decoder layers

    @classmethod
    def from_sets(cls, rows: jax.Array, index: jax.Array, width: int) -> "MergedEmbeddings":
        """From rows holding `1 + K` sets side by side, `[M, (1 + K) E]` (the embeddings first, then DeepStack's)."""
        if rows.shape[-1] == width:
            return cls(rows, index)
        extra = rows[:, width:].reshape(rows.shape[0], -1, width)  # [M, K, E]
        return cls(rows[:, :width], index, extra.transpose(1, 0, 2))  # numpy (serving) or jax rows alike

    @property
    def deepstack_layers(self) -> int:
        return 0 if self.deepstack is None else self.deepstack.shape[0]

    def apply(self, x: jax.Array) -> jax.Array:
        """Token embeddings `[..., E]` with the indexed rows put in."""
        rows = jnp.take(self.embeds, jnp.maximum(self.index, 0), axis=0).astype(x.dtype)
        return jnp.where((self.index >= 0)[..., None], rows, x)

    def add_to_layer_output(self, x: jax.Array, layer: int) -> jax.Array:
        """Layer `layer`'s output `[..., E]` plus DeepStack set `layer` at the indexed tokens."""
        rows = jnp.take(self.deepstack[layer], jnp.maximum(self.index, 0), axis=0).astype(x.dtype)
        return jnp.where((self.index >= 0)[..., None], x + rows, x)


def placeholder_index(input_ids: jax.Array, placeholder_id: int) -> jax.Array:
    """`index` for features laid out in placeholder order: the k-th placeholder (row-major) takes row k."""
    mask = input_ids == placeholder_id
    order = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
    return jnp.where(mask, order, -1).astype(jnp.int32)
