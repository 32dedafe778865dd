"""Token and learned-position embeddings; `weight [num, features]` as in HF.

The table may be replaced by its NF4 form (QLoRA with quantized embeddings) or by the GGUF
blocks it was read from (`quantization="gguf"`: held as the `[features, num]` kernel of the tied
output projection, whose blocks run along the features): a lookup then dequantizes only the rows
it reads, and a GGUF table's `attend` is its block matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model_lib.quantization import NF4Weight, dequantize_nf4, nf4_take_rows
from model_lib.quantization.gguf_blocks import GGUFBlockWeight


class Embed(nnx.Module):
    """Lookup table; `attend` reuses it as a tied output projection."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None],
        dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.axes, self.dtype = axes, jnp.dtype(dtype)
        self.weight: nnx.Param | None = nnx.Param(init(rngs.params(), (num_embeddings, features), dtype), logical_axes=axes)
        self.quantized: NF4Weight | GGUFBlockWeight | None = nnx.data(None)

    def table(self) -> jax.Array:
        if isinstance(self.quantized, GGUFBlockWeight):
            return self.quantized.dequantize(self.dtype).T
        return dequantize_nf4(self.quantized, self.dtype) if self.quantized is not None else self.weight[...]

    def __call__(self, ids: jax.Array) -> jax.Array:
        if isinstance(self.quantized, GGUFBlockWeight):
            return self.quantized.take_columns(ids, self.dtype)
        if self.quantized is not None:
            return nf4_take_rows(self.quantized, ids, self.dtype)
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """`x [..., features] -> [..., num_embeddings]` through the same table."""
        if isinstance(self.quantized, GGUFBlockWeight):
            return self.quantized.matmul(x)
        return jnp.dot(x, self.table().T)
