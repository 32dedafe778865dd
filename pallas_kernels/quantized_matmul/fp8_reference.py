"""W8A8 FP8 matmul in plain jnp: the definition of correct, and the CPU path.

Glossary: M rows of activations, K the contraction (input features), N output features,
G groups along K of B = K / G columns each (one group for per-tensor and per-channel weight
scales; K / 128 for DeepSeek-V3's 128 x 128 blocks).

`fp8_matmul(x [M, K], values [N, K] float8_e4m3fn, scales [G, N] float32)`:
- the weight is `values[n, k] * scales[k // B, n]`, stored in the HF `[out, in]` layout (K
  contiguous: the operand order FP8 GEMMs want). Per-tensor and per-channel checkpoints have
  G = 1; block scales are repeated along N to one scale per output column and K group.
- activations are quantized dynamically per token and K group: `x_scale[m, g] = absmax(x[m, g]) /
  448` (448: the largest float8_e4m3fn value; 1 for an all-zero group), `x_q = e4m3(x / x_scale)`
  rounded to nearest even, as vLLM and DeepSeek-V3 (per-token-per-128 groups) do.
- `out[m, n] = sum_g (x_q[m, g] . values[n, g]) * x_scale[m, g] * scales[g, n]`, accumulated in
  float32, in x's dtype. The reference computes it as one float32 matmul of the dequantized
  operands (equal up to the order of the float32 sums); `fp8_ops` runs the FP8 x FP8 products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_activations(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """`x [M, K]` -> (`x_q [M, K]` float8_e4m3fn, `x_scale [M, G]` float32), per token and K group."""
    rows, depth = x.shape
    xg = x.astype(jnp.float32).reshape(rows, groups, depth // groups)
    scale = jnp.max(jnp.abs(xg), axis=-1) / FP8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(xg / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)  # clip: e4m3fn has no inf
    return q.reshape(rows, depth), scale


def dequantize_fp8(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """The weight `[N, K]` (HF layout) in `dtype`."""
    n, k = values.shape
    groups = scales.shape[0]
    w = values.astype(jnp.float32).reshape(n, groups, k // groups) * scales.T.astype(jnp.float32)[..., None]
    return w.reshape(n, k).astype(dtype)


def fp8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """`x [M, K] @ W^T -> [M, N]` in x's dtype, x quantized to FP8 per token and group (see above)."""
    rows, depth = x.shape
    groups = scales.shape[0]
    q, x_scale = quantize_activations(x, groups)
    xd = (q.astype(jnp.float32).reshape(rows, groups, -1) * x_scale[..., None]).reshape(rows, depth)
    out = jnp.dot(xd, dequantize_fp8(values, scales, jnp.float32).T, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
