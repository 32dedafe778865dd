"""`matmul(x, w)`: XLA's dot everywhere, except small-row float32 products in a scope on the CPU backend.

XLA:CPU runs matmuls with few rows (a decode step: M = the batch) at about a third of what a
BLAS sgemm reaches on the same core (benchmarks/RESULTS.md, `benchmarks.cpu_matmul`). Inside
`small_m_blas()` (the serving step enters it), a float32 `x [..., K] @ w [K, N]` (or `w [N, K]` transposed) with at most
`max_rows` rows runs through numpy's bundled OpenBLAS as an XLA:CPU FFI custom call
(`library.py`). The choice is made per lowering platform (`jax.lax.platform_dependent`), so a
CUDA or TPU lowering never sees the call, and `jnp.dot` stays the definition of correct: it is
the fallback (logged once) when the compiler or the library is missing, and the derivative
rule (a custom JVP of plain dots), so gradients never go through the custom call.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_matmul.library import load

# Rows up to which the custom call replaces XLA's dot. Above it XLA:CPU is as fast or faster
# (prefill-sized products; benchmarks/RESULTS.md).
MAX_ROWS = 64
MAX_ROWS_LIMIT = 4096  # bound of the scope's parameter

_ROWS = contextvars.ContextVar("cpu_matmul_max_rows", default=0)


@contextlib.contextmanager
def small_m_blas(max_rows: int = MAX_ROWS) -> Iterator[None]:
    """Let `matmul` traced in this block use the BLAS custom call for products of <= `max_rows` rows."""
    if not 0 <= max_rows <= MAX_ROWS_LIMIT:
        raise ValueError(f"max_rows must be in [0, {MAX_ROWS_LIMIT}], got {max_rows}")
    token = _ROWS.set(max_rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def reference(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """`x [..., K] @ w [K, N]` (`w [N, K]` transposed with `transpose_w`): the definition of correct."""
    return jnp.dot(x, w.T if transpose_w else w)


def _blas_2d(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transpose_w else w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(load(), out, vmap_method="sequential")(x, w, transpose_w=np.int32(transpose_w))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _blas(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])  # [M, K]: leading axes flattened
    y = jax.lax.platform_dependent(rows, w, cpu=partial(_blas_2d, transpose_w=transpose_w),
                                   default=partial(reference, transpose_w=transpose_w))
    return y.reshape(*x.shape[:-1], y.shape[-1])


@_blas.defjvp
def _blas_jvp(transpose_w, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return _blas(x, w, transpose_w), reference(dx, w, transpose_w) + reference(x, dw, transpose_w)


def uses_blas(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul(x, w)` traced here takes the custom call (on a CPU lowering)."""
    rows = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2 and 0 < rows <= _ROWS.get()
            and load() is not None)


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """`reference(x, w, transpose_w)`; small float32 products in a `small_m_blas` scope use BLAS on a CPU."""
    return _blas(x, w, transpose_w) if uses_blas(x, w) else reference(x, w, transpose_w)
