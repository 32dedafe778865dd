"""W8A8 FP8 matmul (`pallas_kernels.quantized_matmul.fp8_matmul`) against an independent numpy computation.

numpy (with ml_dtypes' float8_e4m3fn for the rounding) quantizes the activations per token and
K group as the contract says and sums the products group by group in float64; the jnp reference
(the CPU path), the Pallas kernel in interpret mode (the CUDA decode path) and the "xla"
implementation (FP8 x FP8 `dot_general`, the CUDA prefill path, which XLA's CPU backend also runs)
must all match it, for the three weight-scale layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.quantized_matmul import fp8_matmul
from pallas_kernels.quantized_matmul.fp8_reference import quantize_activations

E4M3 = ml_dtypes.float8_e4m3fn

# layout -> (K, N, K group width, scales per group): per tensor, per output channel, 128 x 128 blocks
# (repeated along N to one scale per column), and blocks whose last K group is partial (zero-padded).
LAYOUTS = {"tensor": (96, 48, 96, "tensor"), "channel": (96, 48, 96, "channel"), "block": (256, 192, 128, "block"),
           "block-partial-k": (200, 64, 128, "block")}


def weights(layout: str, seed: int = 0):
    """(values [N, Kp] e4m3, scales [G, N] float32, K) with random, nonzero values."""
    depth, width, group, kind = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    groups = -(-depth // group)
    values = np.zeros((width, groups * group), E4M3)
    values[:, :depth] = (rng.standard_normal((width, depth)) * 100).clip(-448, 448).astype(E4M3)
    if kind == "tensor":
        scales = np.full((1, width), rng.uniform(1e-3, 1e-2), np.float32)
    elif kind == "channel":
        scales = rng.uniform(1e-3, 1e-2, (1, width)).astype(np.float32)
    else:  # one scale per 128 output rows and K group, repeated over the rows of its block
        scales = np.repeat(rng.uniform(1e-3, 1e-2, (groups, -(-width // 128))), 128, axis=1)[:, :width]
    return values, np.ascontiguousarray(scales, np.float32), depth


def numpy_w8a8(x: np.ndarray, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    groups, (width, padded) = scales.shape[0], values.shape
    size = padded // groups
    x = np.pad(x.astype(np.float64), ((0, 0), (0, padded - x.shape[1])))
    out = np.zeros((x.shape[0], width))
    for g in range(groups):
        xg = x[:, g * size : (g + 1) * size]
        x_scale = np.abs(xg).max(axis=1, keepdims=True) / 448.0
        x_scale[x_scale == 0] = 1.0
        xq = (xg / x_scale).astype(np.float32).astype(E4M3).astype(np.float64)
        wq = values[:, g * size : (g + 1) * size].astype(np.float64)
        out += (xq @ wq.T) * x_scale * scales[g].astype(np.float64)
    return out


@pytest.mark.parametrize("implementation", ["reference", "interpret", "xla"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fp8_matmul_matches_numpy(layout, implementation):
    values, scales, depth = weights(layout)
    x = np.random.default_rng(1).standard_normal((5, depth)).astype(np.float32)
    x[1] *= 1000.0  # tokens of very different magnitudes keep their own scales
    x[0, :3] = 0.0  # zeros in a group
    got = fp8_matmul(jnp.asarray(x), jnp.asarray(values), jnp.asarray(scales), implementation=implementation)
    expected = numpy_w8a8(x, values, scales)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_activation_quantization_is_per_token_and_group():
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    x[1] *= 1000.0
    x[2, 128:] = 0.0
    q, scale = quantize_activations(jnp.asarray(x), 2)
    expected_scale = np.abs(x.reshape(3, 2, 128)).max(axis=2) / 448.0
    expected_scale[expected_scale == 0] = 1.0
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    expected_q = (x.reshape(3, 2, 128) / expected_scale[..., None]).astype(E4M3).reshape(3, 256)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), expected_q.view(np.uint8))
    assert np.abs(np.asarray(q, np.float32)).max() == 448.0  # each group's absmax maps to the e4m3 maximum


def test_leading_dims_bfloat16_gradient_and_cpu_dispatch():
    values, scales, depth = weights("block")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, depth)), jnp.bfloat16)
    out = jax.jit(fp8_matmul)(x, jnp.asarray(values), jnp.asarray(scales))  # auto: the reference on a CPU
    assert out.shape == (2, 5, values.shape[0]) and out.dtype == jnp.bfloat16
    expected = numpy_w8a8(np.asarray(x, np.float32).reshape(10, depth), values, scales).reshape(out.shape)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=1e-2 * np.abs(expected).max())
    d_out = jnp.asarray(np.random.default_rng(4).standard_normal(out.shape), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(fp8_matmul(x, jnp.asarray(values), jnp.asarray(scales)) * d_out))(
        x.astype(jnp.float32))
    w = values.astype(np.float32).reshape(values.shape[0], scales.shape[0], -1) * scales.T[..., None]
    expected_grad = np.asarray(d_out).reshape(10, -1) @ w.reshape(values.shape[0], -1)[:, :depth]
    np.testing.assert_allclose(np.asarray(grad).reshape(10, depth), expected_grad, rtol=1e-5, atol=1e-4)


def test_bad_shapes_are_refused():
    values, scales, depth = weights("block")
    x = jnp.zeros((2, depth), jnp.float32)
    with pytest.raises(ValueError, match="fp8_matmul"):
        fp8_matmul(x, jnp.asarray(values, jnp.bfloat16), jnp.asarray(scales))  # not FP8
    with pytest.raises(ValueError, match="fp8_matmul"):
        fp8_matmul(x, jnp.asarray(values), jnp.asarray(scales[:, :-1]))  # scales for fewer columns
    with pytest.raises(ValueError, match="fp8_matmul"):
        fp8_matmul(jnp.zeros((2, depth - 128), jnp.float32), jnp.asarray(values), jnp.asarray(scales))  # a group short
    with pytest.raises(ValueError, match="unknown fp8_matmul implementation"):
        fp8_matmul(x, jnp.asarray(values), jnp.asarray(scales), implementation="triton")


# (K groups, rows, implementation): per channel and 128-wide blocks through the kernel and XLA's FP8 GEMMs
GPU_CASES = [(1, 1, None), (32, 1, None), (32, 64, None), (1, 512, None), (32, 512, None), (32, 16, "xla")]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("groups, rows, implementation", GPU_CASES)
def test_cuda_paths_match_reference_on_gpu(groups, rows, implementation):
    """Llama-8B gate/up shape compiled for the GPU (auto: the kernel up to 64 rows, XLA's FP8 GEMMs
    beyond), per-channel and 128-wide block scales; the reference in float32 (not TF32)."""
    depth, width = 4096, 14336
    rng = np.random.default_rng(rows)
    values = jnp.asarray((rng.standard_normal((width, depth)) * 100).clip(-448, 448).astype(E4M3))
    scales = jnp.asarray(rng.uniform(1e-4, 1e-3, (groups, width)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, depth)), jnp.bfloat16)
    got = jax.jit(lambda *a: fp8_matmul(*a, implementation=implementation))(x, values, scales)
    with jax.default_matmul_precision("float32"):
        want = jax.jit(lambda *a: fp8_matmul(*a, implementation="reference"))(x.astype(jnp.float32), values, scales)
    error = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert error < 1e-2, error
