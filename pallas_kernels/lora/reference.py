"""Many-adapter LoRA product in plain jnp, one adapter gathered per token: the definition of correct.

Glossary: T tokens, K input features, R rank (padded to the stack's width), N output
features, L adapter slots.

`lora_delta(x [T, K], a [L, K, R], b [L, R, N], slots [T] int32) -> [T, N]`: token t gets
`(x[t] @ a[slots[t]]) @ b[slots[t]]`; a slot outside `[0, L)` (-1: no adapter) gives zeros.
The shrink product `h = x @ a` accumulates in float32 and is rounded to x's dtype before the
expand product (as the grouped form does); the result has x's dtype. Any LoRA scaling is
folded into `b` by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array) -> jax.Array:
    """Per-token gathered adapters (`[T, K, R]` and `[T, R, N]` held at once: for tests, not speed)."""
    num_slots = a.shape[0]
    valid = (slots >= 0) & (slots < num_slots)
    index = jnp.clip(slots, 0, num_slots - 1)
    h = jnp.einsum("tk,tkr->tr", x, a[index].astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    out = jnp.einsum("tr,trn->tn", h, b[index].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], out, 0).astype(x.dtype)
