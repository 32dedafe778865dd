"""The custom calls that `benchmarks.cpu_matmul` times equal XLA's dot: the BLAS one (one row: sgemv; more:
sgemm) and our own tiled kernel (row tiles and their remainder, vector and narrower column tails, both layouts)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs the system C++ compiler")


@pytest.mark.parametrize("kernel", ["cpu_blas", "cpu_tiled"])
@pytest.mark.parametrize("rows, k, n, transpose_w", [(1, 48, 40, False), (1, 48, 40, True), (16, 24, 72, True),
                                                     (5, 64, 24, False), (13, 40, 107, False), (13, 37, 107, True),
                                                     (16, 33, 200, False)])
def test_custom_call_matches_the_dot(kernel, rows, k, n, transpose_w):
    import importlib

    from benchmarks.cpu_blas import reference

    matmul = importlib.import_module(f"benchmarks.{kernel}").matmul

    rng = np.random.RandomState(rows + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)), jnp.float32)
    got = jax.jit(matmul, static_argnums=2)(x, w, transpose_w)
    np.testing.assert_allclose(got, reference(x, w, transpose_w), rtol=1e-5, atol=1e-5)
