"""Public dense-attention op: the one place that picks an implementation.

Only the jnp reference exists so far; XLA fuses it well enough on CPU and small
GPU shapes. The Pallas flash kernel slots in here, chosen by backend and shape,
without any change to the model code that calls `attention`.
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention import reference


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention with segments; see `reference.attention` for the contract."""
    return reference.attention(
        q,
        k,
        v,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
