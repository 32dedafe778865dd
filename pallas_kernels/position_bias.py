"""T5's relative position buckets as an additive attention bias: a parameter of the attention references.

`RelativePositionBias(table [num_buckets, H], bidirectional, max_distance)` maps query and key positions
to `table[bucket(k_pos - q_pos)]`, one logit per head added before the softmax (after any scale). Buckets
follow Mesh TensorFlow / transformers' `T5Attention._relative_position_bucket`: bidirectional (encoders)
spends half the buckets on keys after the query; causal (decoders) folds future keys into bucket 0. Half
of the (remaining) buckets are exact distances, the rest logarithmic up to `max_distance`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


def relative_bucket(relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket ids (int32, same shape) of `relative` = key position - query position."""
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(relative.dtype) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


@struct.dataclass
class RelativePositionBias:
    """The bias of one attention stack (T5 shares its first layer's table over the whole stack)."""

    table: jax.Array  # [num_buckets, H]
    bidirectional: bool = struct.field(pytree_node=False)
    max_distance: int = struct.field(pytree_node=False)

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """float32 `[..., H]` for broadcast-compatible int position arrays."""
        bucket = relative_bucket((k_positions - q_positions).astype(jnp.int32), bidirectional=self.bidirectional,
                                 num_buckets=self.table.shape[0], max_distance=self.max_distance)
        return jnp.take(self.table.astype(jnp.float32), bucket, axis=0)
