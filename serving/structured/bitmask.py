"""The token bitmask: host rows filled by grammar matchers, applied to the logits inside the jitted sampler.

Row i holds `bitmask_width(V)` int32 words; bit (t % 32) of word (t // 32) allows token t. A row
of all ones (-1 words) leaves its sequence unconstrained, so one array serves a batch mixing
constrained and free sequences, and its shape depends only on the step's bucket (no compile
per request).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

ALL_ALLOWED = -1  # an int32 word with every bit set


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """[S, V] logits with the tokens each [S, W] bitmask row forbids set to -inf."""
    rows, vocab = logits.shape
    bits = jnp.right_shift(bitmask[:, :, None], jnp.arange(32, dtype=jnp.int32))  # [S, W, 32], arithmetic shift
    allowed = (jnp.bitwise_and(bits, 1) != 0).reshape(rows, -1)[:, :vocab]  # token t = word t // 32, bit t % 32
    return jnp.where(allowed, logits, -jnp.inf)


def fill_bitmask(matchers: Iterable[tuple[int, Any]], num_rows: int, width: int) -> np.ndarray:
    """[num_rows, width] int32: row i from the matcher given for it, every other row unconstrained."""
    mask = np.full((num_rows, width), ALL_ALLOWED, np.int32)
    for row, matcher in matchers:
        matcher.fill_next_token_bitmask(mask, row)
    return mask
