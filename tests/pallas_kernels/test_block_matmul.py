"""Block-quantized matmul (GGUF's Q4_0, Q4_1, Q8_0 layouts, blocks of 32): the jnp reference against
numpy by the layout's definition, and the fused Pallas kernel (interpret mode) against the reference.

Interpret mode starts every output as NaN, so a tile no program writes fails the comparison.
K spans several blocks, N several column tiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_matmul import block_matmul, reference

K, N, BLOCK = 128, 64, 32
# GGUF type -> (bits, zero, offsets)
TYPES = {"Q4_0": (4, 8, False), "Q4_1": (4, 0, True), "Q8_0": (8, 0, False)}


def inputs(qtype: str, rows: int, seed: int):
    """x, stored values q [K, N] (unpacked), packed qs, float16 scales and offsets [K / 32, N]."""
    bits, _, has_offsets = TYPES[qtype]
    rng = np.random.RandomState(seed)
    q = rng.randint(0, 16, (K, N)).astype(np.uint8) if bits == 4 else rng.randint(-128, 128, (K, N)).astype(np.int8)
    scales = (rng.rand(K // BLOCK, N) * 0.02 + 0.001).astype(np.float16)
    offsets = (-rng.rand(K // BLOCK, N) * 0.1).astype(np.float16) if has_offsets else None
    if bits == 4:  # ggml's nibble order: byte j of a block holds values j (low) and j + 16 (high)
        halves = q.reshape(K // BLOCK, 2, BLOCK // 2, N)
        qs = (halves[:, 0] | (halves[:, 1] << 4)).reshape(K // 2, N)
    else:
        qs = q
    return rng.randn(rows, K).astype(np.float32), q, qs, scales, offsets


def numpy_weight(qtype, q, scales, offsets):
    """The layout's meaning, row by row: `(q[r] - zero) * scales[r // 32] (+ offsets[r // 32])`."""
    _, zero, _ = TYPES[qtype]
    b = np.arange(K) // BLOCK
    w = (q.astype(np.float32) - zero) * scales[b].astype(np.float32)
    return w if offsets is None else w + offsets[b].astype(np.float32)


def call(qtype, x, qs, scales, offsets, dtype=jnp.float32, **options):
    bits, zero, _ = TYPES[qtype]
    return block_matmul(jnp.asarray(x, dtype), jnp.asarray(qs), jnp.asarray(scales),
                        None if offsets is None else jnp.asarray(offsets), bits=bits, zero=zero, **options)


# Both reference forms: per-block products (decode-sized) and the dequantized kernel (more rows).
@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_reference_follows_the_layout(qtype, rows):
    x, q, qs, scales, offsets = inputs(qtype, rows, seed=rows)
    bits, zero, _ = TYPES[qtype]
    weight = numpy_weight(qtype, q, scales, offsets)
    np.testing.assert_array_equal(np.asarray(reference.dequantize(qs, scales, offsets, bits, zero, jnp.float32)), weight)
    np.testing.assert_allclose(np.asarray(call(qtype, x, qs, scales, offsets)), x @ weight, rtol=1e-5, atol=1e-5)


# (rows, activation dtype): decode-sized calls (16-row tiles, M padded), and a prefill-sized one (128-row tiles).
CASES = [(1, jnp.float32), (5, jnp.bfloat16), (130, jnp.bfloat16)]


@pytest.mark.parametrize("rows,dtype", CASES)
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_kernel_matches_reference(qtype, rows, dtype):
    x, _, qs, scales, offsets = inputs(qtype, rows, seed=7 + rows)
    expected = np.asarray(call(qtype, x, qs, scales, offsets, dtype, implementation="reference"), np.float32)
    got = np.asarray(call(qtype, x, qs, scales, offsets, dtype, implementation="interpret"), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_bad_shapes_are_refused():
    x, _, qs, scales, offsets = inputs("Q4_1", 2, seed=0)
    with pytest.raises(ValueError, match="block_matmul: x"):
        call("Q4_1", x[:, :64], qs, scales, offsets)
    with pytest.raises(ValueError, match="bits 3"):
        block_matmul(jnp.asarray(x), jnp.asarray(qs), jnp.asarray(scales), bits=3)
    with pytest.raises(ValueError, match="unknown block_matmul implementation"):
        call("Q4_1", x, qs, scales, offsets, implementation="fast")
