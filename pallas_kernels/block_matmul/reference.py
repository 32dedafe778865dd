"""Block-quantized weight-only matmul in plain jnp: the definition of correct, and the CPU path.

Glossary: M rows of activations, K the contraction (input features), N output features,
G the block size (rows of the weight sharing one scale and offset; GGUF's 32).

`block_matmul(x [M, K], qs, scales [K / G, N], offsets [K / G, N] or None, bits, zero)`: weight row
`r` of block `b = r // G` is `(q[r] - zero) * scales[b] (+ offsets[b])`, computed in float32 in that
order (the order `gguf.quants.dequantize` uses, so the weights match it bit for bit):
- bits 4: `qs [K / 2, N]` uint8; within a block the first `G / 2` rows sit in the low nibbles of the
  block's `G / 2` packed rows and the last `G / 2` rows in the high nibbles. This is ggml's own
  nibble order (byte j of a Q4 block holds values j and j + 16) and `quantized_matmul`'s
  group-halves layout, so a GGUF block's bytes are the packed column as they are.
- bits 8: `qs [K, N]` int8.
GGUF's types: Q4_0 is bits 4, zero 8, no offsets; Q4_1 bits 4, zero 0, offsets (its min);
Q8_0 bits 8, zero 0, no offsets. Scales and offsets may be stored in float16 (GGUF's own).

Products accumulate in float32; the weight is dequantized in float32 and rounded to x's dtype
before the product (what the kernel does tile by tile); the result has x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = (4, 8)
# Up to this many rows the matmul runs block by block on the stored values (no dequantized kernel).
GROUPED_ROWS = 16


def block_values(qs: jax.Array, bits: int, blocks: int) -> jax.Array:
    """The stored values as float32 `[K / G, G, N]` (0..15 for 4 bits, -128..127 for 8)."""
    n = qs.shape[-1]
    if bits == 8:
        return qs.astype(jnp.float32).reshape(blocks, -1, n)
    halves = qs.reshape(blocks, 1, -1, n)
    return jnp.concatenate([halves & 0xF, halves >> 4], axis=1).astype(jnp.float32).reshape(blocks, -1, n)


def dequantize(qs: jax.Array, scales: jax.Array, offsets: jax.Array | None, bits: int, zero: int, dtype) -> jax.Array:
    """The `[K, N]` weight in `dtype`."""
    q = block_values(qs, bits, scales.shape[0])
    w = (q - zero) * scales.astype(jnp.float32)[:, None] if zero else q * scales.astype(jnp.float32)[:, None]
    if offsets is not None:
        w = w + offsets.astype(jnp.float32)[:, None]
    return w.reshape(-1, qs.shape[-1]).astype(dtype)


def block_matmul(x: jax.Array, qs: jax.Array, scales: jax.Array, offsets: jax.Array | None, bits: int,
                 zero: int) -> jax.Array:
    """`x [M, K] @ dequantize(...) -> [M, N]` in x's dtype.

    Decode-sized calls use `x @ W = sum_b ((x_b @ q_b) - zero sum(x_b)) * s_b + sum(x_b) * o_b` over
    the blocks b, which reads the stored values once and never builds the float kernel; longer
    calls dequantize first (the `[M, K / G, N]` partial sums would outgrow the kernel).
    """
    if x.shape[0] > GROUPED_ROWS:
        w = dequantize(qs, scales, offsets, bits, zero, x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    blocks = scales.shape[0]
    q = block_values(qs, bits, blocks)  # [K / G, G, N]
    xb = x.astype(jnp.float32).reshape(x.shape[0], blocks, -1)  # [M, K / G, G]
    sums = xb.sum(axis=2)  # [M, K / G]
    partial = jnp.einsum("mbk,bkn->mbn", xb, q) - zero * sums[:, :, None]
    out = jnp.einsum("mbn,bn->mn", partial, scales.astype(jnp.float32))
    if offsets is not None:
        out = out + sums @ offsets.astype(jnp.float32)
    return out.astype(x.dtype)
