"""Public weight-only quantized matmuls: `int4_matmul` and `int8_matmul` over `x [..., K]`.

Contracts in `reference.py`. Implementations, picked by `implementation` or, when it is None,
by lowering platform and shape (`pallas_kernels.dispatch.on_cuda`):
- "kernel": the fused dequantize-matmul Pallas Triton kernels of `triton_kernel.py`, where the
  computation is lowered for CUDA and tiles fit (float32/bfloat16/float16 activations);
- "interpret": the same kernels on the Pallas interpreter (any backend; for tests);
- "reference": the jnp reference (every other platform, and the logged fallback).
The ops are differentiable in x (a LoRA adapter on a quantized base trains through them): the
input gradient is `d_out @ W^T` with W dequantized by the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.quantized_matmul import reference, triton_kernel

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _int4(x, packed, scales, zeros, implementation):
    if implementation == "reference":
        return reference.int4_matmul(x, packed, scales, zeros)
    if implementation == "auto":
        return on_cuda(triton_kernel.int4_matmul, reference.int4_matmul, x, packed, scales, zeros)
    return triton_kernel.int4_matmul(x, packed, scales, zeros, interpret=implementation == "interpret")


def _int4_fwd(x, packed, scales, zeros, implementation):
    return _int4(x, packed, scales, zeros, implementation), (packed, scales, zeros)


def _int4_bwd(implementation, residuals, d_out):
    packed, scales, zeros = residuals
    w = reference.dequantize_int4(packed, scales, zeros, d_out.dtype)
    return jnp.dot(d_out, w.T), None, None, None


_int4.defvjp(_int4_fwd, _int4_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int8(x, values, scale, implementation):
    if implementation == "reference":
        return reference.int8_matmul(x, values, scale)
    if implementation == "auto":
        return on_cuda(triton_kernel.int8_matmul, reference.int8_matmul, x, values, scale)
    return triton_kernel.int8_matmul(x, values, scale, interpret=implementation == "interpret")


def _int8_fwd(x, values, scale, implementation):
    return _int8(x, values, scale, implementation), (values, scale)


def _int8_bwd(implementation, residuals, d_out):
    values, scale = residuals
    w = (values.astype(jnp.float32) * scale.astype(jnp.float32)).astype(d_out.dtype)
    return jnp.dot(d_out, w.T), None, None


_int8.defvjp(_int8_fwd, _int8_bwd)


def _choose(implementation: str | None, op: str, tiles, x: jax.Array, detail: str) -> str:
    if implementation is None:
        if triton_kernel.supported(x.dtype, tiles):
            return "auto"
        warn_fallback(op, f"{detail}, activations {x.dtype} (tiles need power-of-two sides >= 16)")
        return "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {op} implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                implementation: str | None = None) -> jax.Array:
    """`x [..., K] @ W -> [..., N]`, W the int4 weight of `reference.py`'s layout."""
    k, n = 2 * packed.shape[0], packed.shape[1]
    if x.shape[-1] != k or scales.shape != zeros.shape or scales.shape[1] != n or k % scales.shape[0]:
        raise ValueError(f"int4_matmul: x {x.shape}, packed {packed.shape}, scales {scales.shape}, zeros {zeros.shape}")
    rows = _rows(x)
    group_size = k // scales.shape[0]
    tiles = triton_kernel.int4_config(rows.shape[0], k, n, group_size)
    chosen = _choose(implementation, "int4_matmul", tiles, x, f"K={k}, N={n}, group {group_size}")
    return _int4(rows, packed, scales, zeros, chosen).reshape(*x.shape[:-1], n)


def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """`x [..., K] @ (values * scale) -> [..., N]`."""
    k, n = values.shape
    if x.shape[-1] != k or scale.shape != (n,):
        raise ValueError(f"int8_matmul: x {x.shape}, values {values.shape}, scale {scale.shape}")
    rows = _rows(x)
    tiles = triton_kernel.int8_config(rows.shape[0], k, n)
    chosen = _choose(implementation, "int8_matmul", tiles, x, f"K={k}, N={n}")
    return _int8(rows, values, scale, chosen).reshape(*x.shape[:-1], n)
