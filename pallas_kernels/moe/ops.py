"""Public grouped (ragged) matmul for mixture-of-experts layers.

Contract: `grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G] int32) -> [M, N]`.
The rows of lhs are sorted by group (expert): rows `[start_g, start_g + group_sizes[g])`,
`start_g = sum(group_sizes[:g])`, are multiplied by `rhs[g]`. `sum(group_sizes) <= M`;
rows at or past the sum come out as zeros (an MoE layer pads its token count to a
static M). Empty groups are allowed. Products accumulate in float32; the result has
lhs's dtype. The semantics are those of `jax.lax.ragged_dot(lhs, rhs, group_sizes)`,
and the op is differentiable in lhs and rhs (not in group_sizes).

Implementations, picked by `implementation` or, when it is None, by lowering platform and
shape (`pallas_kernels.dispatch.on_cuda`):
- "kernel": the Pallas Triton kernels of `triton_kernel.py` (forward, and a custom VJP
  whose input gradient is the same kernel on rhs read transposed and whose weight
  gradient is a transposed grouped matmul kernel). Used when lowering for CUDA where K
  and N are multiples of 16 and lhs and rhs share a float32, bfloat16 or float16 dtype.
- "interpret": the same kernels on the Pallas interpreter (any backend; for tests).
- "mosaic": the Mosaic GPU forward kernel of `mosaic_kernel.py` (TMA, wgmma, a persistent
  grid) with the Triton backward; bfloat16/float16, K and N multiples of 64; CUDA only.
  Never chosen by itself until a GPU measures it faster (`benchmarks/moe.py`).
- "reference": `jax.lax.ragged_dot` (every other platform, and the logged fallback).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.moe import mosaic_kernel, reference, triton_kernel

IMPLEMENTATIONS = ("kernel", "interpret", "mosaic", "reference")


def choose_implementation(lhs: jax.Array, rhs: jax.Array) -> str:
    """What runs when lowering for CUDA: "kernel" where it covers the shapes, else "reference"."""
    return "kernel" if triton_kernel.supported(lhs.shape, rhs.shape, lhs.dtype, rhs.dtype) else "reference"


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    **options,
) -> jax.Array:
    """See the module docstring; `options` go to the kernel (`triton_kernel.grouped_matmul`:
    block sizes, `num_warps`, `num_stages`, `precision`) and are ignored by the reference.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],) or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, {rhs.shape}, "
                         f"{group_sizes.shape}")
    if implementation is None:
        if choose_implementation(lhs, rhs) == "kernel":
            kernel = functools.partial(triton_kernel.grouped_matmul, **options)
            return on_cuda(kernel, reference.grouped_matmul, lhs, rhs, group_sizes)
        warn_fallback("grouped_matmul", f"K={lhs.shape[1]}, N={rhs.shape[2]} (multiples of 16 needed), dtypes "
                                        f"{lhs.dtype}/{rhs.dtype} (one of float32, bfloat16, float16 for both)")
        implementation = "reference"
    if implementation == "reference":
        return reference.grouped_matmul(lhs, rhs, group_sizes)
    if implementation in ("kernel", "interpret"):
        return triton_kernel.grouped_matmul(lhs, rhs, group_sizes, interpret=implementation == "interpret", **options)
    if implementation == "mosaic":
        reason = mosaic_kernel.unsupported_reason(lhs.shape, rhs.shape, lhs.dtype, rhs.dtype)
        if reason or options:
            raise ValueError(f"the Mosaic grouped matmul does not cover {reason or f'options {sorted(options)}'}")
        return mosaic_kernel.grouped_matmul(lhs, rhs, group_sizes)
    raise ValueError(f"unknown grouped matmul implementation {implementation!r}")
