"""The BLAS custom call that `benchmarks.cpu_matmul` times equals XLA's dot (one row: sgemv; more: sgemm)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs the system C++ compiler")


@pytest.mark.parametrize("rows, k, n, transpose_w", [(1, 48, 40, False), (1, 48, 40, True), (16, 24, 72, True),
                                                     (5, 64, 24, False)])
def test_blas_custom_call_matches_the_dot(rows, k, n, transpose_w):
    from benchmarks.cpu_blas import matmul, reference

    rng = np.random.RandomState(rows + k)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)), jnp.float32)
    got = jax.jit(matmul, static_argnums=2)(x, w, transpose_w)
    np.testing.assert_allclose(got, reference(x, w, transpose_w), rtol=1e-5, atol=1e-5)
