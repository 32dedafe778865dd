"""Weight-only quantized matmuls in plain jnp: the definition of correct, and the CPU path.

Glossary: M rows of activations, K the contraction (input features), N output features,
G the int4 group size (rows of the weight sharing one scale and zero point).

int4 (`int4_matmul(x [M, K], packed [K / 2, N] uint8, scales [K / G, N] float32, zeros [K / G, N] uint8)`):
weight row `r` of group `g = r // G` is `(q[r] - zeros[g]) * scales[g]` with `q` in [0, 15]. Within a
group the first `G / 2` rows sit in the low nibbles of the group's `G / 2` packed rows and the last
`G / 2` rows in the high nibbles (`pack_int4`): a kernel then unpacks a packed tile into two weight
tiles without interleaving them.

int8 (`int8_matmul(x [M, K], values [K, N] int8, scale [N] float32)`): weight `values * scale`
(one scale per output column), applied to the output: `(x @ values) * scale`.

Products accumulate in float32; the weight is dequantized in float32 and rounded to x's dtype
before the product (what the kernels do tile by tile); the result has x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pack_int4(q: np.ndarray, group_size: int) -> np.ndarray:
    """`q [K, N]` (values 0..15) -> `packed [K / 2, N]` uint8 in the group-halves layout above."""
    k, n = q.shape
    halves = np.asarray(q, np.uint8).reshape(k // group_size, 2, group_size // 2, n)
    return (halves[:, 0] | (halves[:, 1] << 4)).reshape(k // 2, n)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
    """`packed [K / 2, N]` -> `q [K, N]` uint8 (the inverse of `pack_int4`; traceable)."""
    half_k, n = packed.shape
    low = (packed & 0xF).reshape(-1, 1, group_size // 2, n)
    high = (packed >> 4).reshape(-1, 1, group_size // 2, n)
    return jnp.concatenate([low, high], axis=1).reshape(2 * half_k, n)


def dequantize_int4(packed: jax.Array, scales: jax.Array, zeros: jax.Array, dtype) -> jax.Array:
    """The `[K, N]` weight in `dtype`."""
    group_size = 2 * packed.shape[0] // scales.shape[0]
    q = unpack_int4(packed, group_size).astype(jnp.float32).reshape(scales.shape[0], group_size, -1)
    w = (q - zeros.astype(jnp.float32)[:, None]) * scales.astype(jnp.float32)[:, None]
    return w.reshape(2 * packed.shape[0], -1).astype(dtype)


# Up to this many rows the matmul runs group by group on the 4-bit values (no dequantized kernel).
GROUPED_ROWS = 16


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    """`x [M, K] @ dequantize_int4(...) -> [M, N]` in x's dtype.

    Decode-sized calls use `x @ W = sum_g ((x_g @ q_g) * s_g - sum(x_g) * z_g * s_g)` over the groups g,
    which reads the 4-bit values once and never builds the float kernel (on a CPU the dequantized
    kernel costs several passes over K x N floats per token); its `[M, K / G, N]` partial sums
    would outgrow the kernel itself for long prefills, which dequantize first.
    """
    if x.shape[0] > GROUPED_ROWS:
        w = dequantize_int4(packed, scales, zeros, x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    groups, n = scales.shape
    half = packed.shape[0] // groups
    # float32 throughout (exact for x and the 4-bit values; XLA's CPU batched dot takes no bf16 -> f32).
    low = (packed & 0xF).reshape(groups, half, n).astype(jnp.float32)  # rows [0, G / 2) of each group
    high = (packed >> 4).reshape(groups, half, n).astype(jnp.float32)  # rows [G / 2, G)
    xg = x.astype(jnp.float32).reshape(x.shape[0], groups, 2, half)
    partial = jnp.einsum("mgk,gkn->mgn", xg[:, :, 0], low) + jnp.einsum("mgk,gkn->mgn", xg[:, :, 1], high)
    scales = scales.astype(jnp.float32)
    sums = xg.sum(axis=(2, 3))  # [M, K / G]
    out = jnp.einsum("mgn,gn->mn", partial, scales) - sums @ (zeros.astype(jnp.float32) * scales)
    return out.astype(x.dtype)


def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array) -> jax.Array:
    """`x [M, K] @ (values * scale) -> [M, N]` in x's dtype, the scale applied to the output."""
    acc = jnp.dot(x, values.astype(x.dtype), preferred_element_type=jnp.float32)
    return (acc * scale.astype(jnp.float32)).astype(x.dtype)
