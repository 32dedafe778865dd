"""Token and learned-position embeddings; `weight [num, features]` as in HF."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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
        self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), dtype), logical_axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """`x [..., features] -> [..., num_embeddings]` through the same table."""
        return jnp.dot(x, self.weight[...].T)
