"""The Mosaic GPU grouped matmul (`pallas_kernels/moe/mosaic_kernel.py`) on Mosaic GPU's interpreter.

The interpreter (`InterpretGPUParams`, private to jax) simulates the kernel's threads, shared
memory, TMA copies, barriers and wgmma on the CPU, so this checks the kernel's schedule and
row-ladder stores against `jax.lax.ragged_dot`; speed and the real lowering to PTX need a GPU
(`test_moe.py::test_kernel_matches_reference_on_gpu[mosaic-...]`, `benchmarks/moe.py`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import mosaic_kernel, reference

params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                             reason="this jax has no Mosaic GPU interpreter")


def test_gmm_matches_reference_in_interpret_mode():
    """Groups that share row tiles, an empty group, rows past the groups (zeros), two N tiles,
    and more (visit, N tile) pairs than programs (the persistent loop wraps)."""
    rng = np.random.RandomState(0)
    sizes = jnp.asarray([70, 0, 100], jnp.int32)  # 30 rows past the groups; tiles [0, 64) [64, 128) ...
    lhs = jnp.asarray(rng.randn(200, 128), jnp.bfloat16)
    rhs = jnp.asarray(rng.randn(3, 128, 128) / np.sqrt(128), jnp.bfloat16)
    got = mosaic_kernel.gmm(lhs, rhs, sizes, block_m=64, block_n=64, num_sms=4, interpret=params.InterpretGPUParams())
    want = reference.grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    assert got.dtype == jnp.bfloat16 and got.shape == (200, 128)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
    assert not np.asarray(got[170:], np.float32).any()


def test_unsupported_shapes_are_refused():
    lhs, rhs, sizes = jnp.zeros((8, 96), jnp.bfloat16), jnp.zeros((2, 96, 64), jnp.bfloat16), jnp.zeros(2, jnp.int32)
    assert "multiples of 64" in mosaic_kernel.unsupported_reason(lhs.shape, rhs.shape, lhs.dtype, rhs.dtype)
    assert "bfloat16" in mosaic_kernel.unsupported_reason((8, 64), (2, 64, 64), jnp.float32, jnp.float32)
    with pytest.raises(ValueError, match="does not cover"):
        mosaic_kernel.gmm(lhs, rhs, sizes)
    with pytest.raises(ValueError, match="block_m"):
        mosaic_kernel.gmm(jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((2, 64, 64), jnp.bfloat16), sizes, block_m=32)
