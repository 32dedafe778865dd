"""Weight-only int4 / int8 matmuls: the jnp reference against numpy by the layout's definition, and
the fused Pallas kernels (interpret mode) against the reference, at decode and prefill row counts.

Interpret mode starts every output as NaN, so a tile no program writes fails the comparison.
Shapes stay small: K spans several groups and K steps, N several column tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quantized_matmul import int4_matmul, int8_matmul, reference, triton_kernel

K, N = 256, 128


def int4_inputs(seed: int, group_size: int, rows: int = 3):
    rng = np.random.RandomState(seed)
    q = rng.randint(0, 16, (K, N)).astype(np.uint8)
    scales = (rng.rand(K // group_size, N) * 0.02 + 0.001).astype(np.float32)
    zeros = rng.randint(0, 16, (K // group_size, N)).astype(np.uint8)
    x = rng.randn(rows, K).astype(np.float32)
    return x, q, scales, zeros


def numpy_weight(q, scales, zeros):
    """The layout's meaning, row by row: `(q[r] - zeros[r // G]) * scales[r // G]`."""
    group = q.shape[0] // scales.shape[0]
    g = np.arange(q.shape[0]) // group
    return (q.astype(np.float32) - zeros[g].astype(np.float32)) * scales[g]


# Both reference forms: per-group products (decode-sized) and the dequantized kernel (more rows).
@pytest.mark.parametrize("group_size,rows", [(32, 3), (128, 40)])
def test_int4_reference_follows_the_layout(group_size, rows):
    x, q, scales, zeros = int4_inputs(0, group_size, rows)
    packed = reference.pack_int4(q, group_size)
    assert packed.shape == (K // 2, N) and packed.dtype == np.uint8
    # Group-halves layout: low nibbles hold each group's first half, high nibbles its second.
    np.testing.assert_array_equal(packed[: group_size // 2] & 0xF, q[: group_size // 2])
    np.testing.assert_array_equal(packed[: group_size // 2] >> 4, q[group_size // 2 : group_size])
    np.testing.assert_array_equal(np.asarray(reference.unpack_int4(jnp.asarray(packed), group_size)), q)
    ours = int4_matmul(jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(zeros))
    np.testing.assert_allclose(np.asarray(ours), x @ numpy_weight(q, scales, zeros), rtol=1e-5, atol=1e-5)


# (rows, activation dtype): decode-sized calls (16-row tiles, M padded), and a prefill-sized one (128-row tiles).
CASES = [(1, jnp.float32), (5, jnp.bfloat16), (16, jnp.float32), (130, jnp.bfloat16)]


@pytest.mark.parametrize("rows,dtype,group_size", [(*case, 128) for case in CASES] + [(5, jnp.float32, 64)])
def test_int4_kernel_matches_reference(rows, dtype, group_size):
    x, q, scales, zeros = int4_inputs(rows, group_size, rows)
    args = (jnp.asarray(x, dtype), jnp.asarray(reference.pack_int4(q, group_size)), jnp.asarray(scales),
            jnp.asarray(zeros))
    expected = int4_matmul(*args, implementation="reference")
    got = int4_matmul(*args, implementation="interpret")
    assert got.dtype == dtype and got.shape == (rows, N)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("rows,dtype", CASES)
def test_int8_kernel_matches_reference(rows, dtype):
    rng = np.random.RandomState(rows)
    values = rng.randint(-127, 128, (K, N)).astype(np.int8)
    scale = (rng.rand(N) * 0.01).astype(np.float32)
    x = jnp.asarray(rng.randn(rows, K).astype(np.float32), dtype)
    expected = int8_matmul(x, jnp.asarray(values), jnp.asarray(scale), implementation="reference")
    np.testing.assert_allclose(np.asarray(expected, np.float32), np.asarray(x, np.float32) @ (values * scale),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)
    got = int8_matmul(x, jnp.asarray(values), jnp.asarray(scale), implementation="interpret")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol)


def test_leading_dims_gradient_and_cpu_dispatch():
    """`[..., K]` inputs; the input gradient is `d_out @ W^T`; on CPU the dispatch compiles the reference."""
    x, q, scales, zeros = int4_inputs(7, 128, 6)
    weights = (jnp.asarray(reference.pack_int4(q, 128)), jnp.asarray(scales), jnp.asarray(zeros))
    x3 = jnp.asarray(x.reshape(2, 3, K))
    out = jax.jit(int4_matmul)(x3, *weights)
    np.testing.assert_allclose(np.asarray(out).reshape(6, N), x @ numpy_weight(q, scales, zeros), rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: int4_matmul(x, *weights).sum())(x3)
    np.testing.assert_allclose(np.asarray(grad).reshape(6, K), np.ones((6, N)) @ numpy_weight(q, scales, zeros).T,
                               rtol=1e-5, atol=1e-5)
    hlo = jax.jit(int4_matmul).lower(x3, *weights).as_text()
    assert "triton" not in hlo


def test_bad_shapes_and_untiled_calls_are_refused():
    x, q, scales, zeros = int4_inputs(0, 128)
    packed = jnp.asarray(reference.pack_int4(q, 128))
    with pytest.raises(ValueError, match="int4_matmul: x"):
        int4_matmul(jnp.zeros((2, K + 2)), packed, jnp.asarray(scales), jnp.asarray(zeros))
    with pytest.raises(ValueError, match="unknown int8_matmul implementation 'gpu'"):
        int8_matmul(jnp.zeros((2, K)), jnp.zeros((K, N), jnp.int8), jnp.ones((N,)), implementation="gpu")
    assert triton_kernel.int4_config(4, 80, 128, 40) is None  # half a group (20) holds no 16-row power of two
    with pytest.raises(ValueError, match="no int4 tiles fit"):
        triton_kernel.int4_matmul(jnp.zeros((2, 80)), jnp.zeros((40, 128), jnp.uint8), jnp.ones((2, 128)),
                                  jnp.zeros((2, 128), jnp.uint8), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("rows", [1, 16, 512])
@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_kernels_match_reference_on_gpu(bits, rows):
    """Llama-8B gate/up shape, compiled for the GPU; the reference in float32 (not TF32)."""
    depth, width = 4096, 14336
    rng = np.random.RandomState(rows)
    x = jnp.asarray(rng.randn(rows, depth), jnp.bfloat16)
    if bits == "int4":
        _, q, scales, zeros = int4_inputs(rows, 128)  # the small K x N table, tiled to the layer
        q, scales, zeros = np.tile(q, (depth // K, width // N)), np.tile(scales, (depth // K, width // N)), \
            np.tile(zeros, (depth // K, width // N))
        weights = (jnp.asarray(reference.pack_int4(q, 128)), jnp.asarray(scales), jnp.asarray(zeros))
        op = int4_matmul
    else:
        weights = (jnp.asarray(rng.randint(-127, 128, (depth, width)).astype(np.int8)),
                   jnp.asarray((rng.rand(width) * 0.01).astype(np.float32)))
        op = int8_matmul
    got = jax.jit(lambda x, *w: op(x, *w, implementation="kernel"))(x, *weights)
    with jax.default_matmul_precision("float32"):
        want = jax.jit(lambda x, *w: op(x, *w, implementation="reference"))(x.astype(jnp.float32), *weights)
    error = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert error < 1e-2, error
