"""Public block-quantized matmul: `block_matmul` over `x [..., K]` (contract in `reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`):
- "kernel": the fused dequantize-matmul Pallas Triton kernel of `triton_kernel.py`, where the
  computation is lowered for CUDA and tiles fit (float32/bfloat16/float16 activations);
- "interpret": the same kernel on the Pallas interpreter (any backend; for tests);
- "reference": the jnp reference (every other platform, and the logged fallback).
Differentiable in x (a LoRA adapter on a GGUF base trains through it): the input gradient is
`d_out @ W^T` with W dequantized by the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_matmul import reference, triton_kernel
from pallas_kernels.dispatch import on_cuda, warn_fallback

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _matmul(x, qs, scales, offsets, bits, zero, implementation):
    ref = functools.partial(reference.block_matmul, bits=bits, zero=zero)
    if implementation == "reference":
        return ref(x, qs, scales, offsets)
    kernel = functools.partial(triton_kernel.block_matmul, bits=bits, zero=zero)
    if implementation == "auto":
        return on_cuda(kernel, ref, x, qs, scales, offsets)
    return kernel(x, qs, scales, offsets, interpret=implementation == "interpret")


def _matmul_fwd(x, qs, scales, offsets, bits, zero, implementation):
    return _matmul(x, qs, scales, offsets, bits, zero, implementation), (qs, scales, offsets)


def _matmul_bwd(bits, zero, implementation, residuals, d_out):
    qs, scales, offsets = residuals
    w = reference.dequantize(qs, scales, offsets, bits, zero, d_out.dtype)
    return jnp.dot(d_out, w.T), None, None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def block_matmul(x: jax.Array, qs: jax.Array, scales: jax.Array, offsets: jax.Array | None = None, *, bits: int,
                 zero: int = 0, implementation: str | None = None) -> jax.Array:
    """`x [..., K] @ W -> [..., N]`, W the block-quantized weight of `reference.py`'s layout."""
    if bits not in reference.BITS:
        raise ValueError(f"block_matmul: bits {bits} not in {reference.BITS}")
    k, n = x.shape[-1], qs.shape[-1]
    stored_k = qs.shape[0] * (2 if bits == 4 else 1)
    if (stored_k != k or scales.shape[1] != n or k % scales.shape[0] or (k // scales.shape[0]) % 2
            or (offsets is not None and offsets.shape != scales.shape)):
        raise ValueError(f"block_matmul: x {x.shape}, qs {qs.shape} ({bits} bits), scales {scales.shape}, "
                         f"offsets {None if offsets is None else offsets.shape}")
    rows = x.reshape(-1, k)
    block_size = k // scales.shape[0]
    if implementation is None:
        if triton_kernel.supported(x.dtype, triton_kernel.block_config(rows.shape[0], k, n, block_size)):
            implementation = "auto"
        else:
            warn_fallback("block_matmul", f"K={k}, N={n}, blocks of {block_size}, activations {x.dtype} "
                                          "(tiles need power-of-two sides >= 16)")
            implementation = "reference"
    elif implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown block_matmul implementation {implementation!r}; supported: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    return _matmul(rows, qs, scales, offsets, bits, zero, implementation).reshape(*x.shape[:-1], n)
