"""The CPU BLAS matmul (`pallas_kernels.cpu_matmul`) against its jnp reference, and where it is (not) used."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_matmul
from pallas_kernels.cpu_matmul import library
from pallas_kernels.gpu_lowering import lower_for_h100

needs_blas = pytest.mark.skipif(cpu_matmul.load() is None, reason="no C++ compiler or numpy OpenBLAS here")


def operands(lead: tuple[int, ...], k: int, n: int, transpose_w: bool, dtype=jnp.float32):
    rng = np.random.RandomState(sum(lead) + k + n)
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)), dtype)
    return x, w


def scoped(max_rows: int = cpu_matmul.MAX_ROWS, transpose_w: bool = False):
    def f(x, w):
        with cpu_matmul.small_m_blas(max_rows):
            return cpu_matmul.matmul(x, w, transpose_w=transpose_w)

    return jax.jit(f)


def custom_calls(lowered) -> int:
    return lowered.as_text().count(library.TARGET)


@needs_blas
@pytest.mark.parametrize("lead, k, n, transpose_w", [
    ((1,), 48, 40, False), ((1,), 48, 40, True), ((5,), 64, 24, False), ((16,), 24, 72, True), ((2, 3), 32, 16, False),
])
def test_matches_reference_and_takes_the_custom_call(lead, k, n, transpose_w):
    x, w = operands(lead, k, n, transpose_w)
    fn = scoped(transpose_w=transpose_w)
    assert custom_calls(fn.lower(x, w)) == 1
    np.testing.assert_allclose(fn(x, w), cpu_matmul.reference(x, w, transpose_w), rtol=1e-5, atol=1e-5)


@needs_blas
def test_gradients_use_the_reference_rule():
    x, w = operands((4,), 32, 16, False)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    got = jax.grad(loss(scoped()), argnums=(0, 1))(x, w)
    want = jax.grad(loss(cpu_matmul.reference), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["outside scope", "too many rows", "bfloat16"])
def test_plain_dot_where_the_custom_call_does_not_apply(case):
    x, w = operands((cpu_matmul.MAX_ROWS + 1,) if case == "too many rows" else (4,), 32, 16, False,
                    jnp.bfloat16 if case == "bfloat16" else jnp.float32)
    fn = jax.jit(cpu_matmul.matmul) if case == "outside scope" else scoped()
    assert custom_calls(fn.lower(x, w)) == 0
    np.testing.assert_allclose(np.asarray(fn(x, w), np.float32), np.asarray(cpu_matmul.reference(x, w), np.float32))


def test_a_cuda_lowering_never_sees_the_custom_call():
    x, w = operands((4,), 32, 16, False)
    assert custom_calls(lower_for_h100(scoped(), x, w)) == 0


def test_missing_library_falls_back_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(library, "openblas_candidates", lambda: [])
    library.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="pallas_kernels"):
            assert library.load() is None
        assert "OpenBLAS" in caplog.text and "XLA:CPU dots are used" in caplog.text
        x, w = operands((4,), 32, 16, False)
        assert custom_calls(scoped().lower(x, w)) == 0
    finally:
        library.load.cache_clear()


def test_the_scope_bounds_its_rows():
    with pytest.raises(ValueError, match="max_rows"):
        with cpu_matmul.small_m_blas(-1):
            pass
