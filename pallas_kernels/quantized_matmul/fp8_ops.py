"""Public W8A8 FP8 matmul: `fp8_matmul(x [..., K], values [N, Kp], scales [G, N])`.

Contract in `fp8_reference.py`. Implementations, picked by `implementation` or, when it is None,
by lowering platform (`pallas_kernels.dispatch.on_cuda`) and rows:
- "kernel": the Pallas Triton kernel of `fp8_kernel.py` (FP8 weights read once, widened to bf16
  in registers for the MMA): the CUDA path for decode-sized calls (up to 64 rows), which are
  bound by reading the weights;
- "interpret": the same kernel on the Pallas interpreter (any backend; for tests);
- "xla": activations quantized in jnp, then `lax.dot_general` on float8_e4m3fn operands with
  float32 results (`preferred_element_type`), one per K group, each scaled by its activation
  and weight scales and summed in float32. XLA's GPU compiler rewrites an FP8 x FP8 dot into a
  cuBLASLt FP8 GEMM (FP8 wgmma on Hopper); other backends upcast. The CUDA path for larger
  calls (prefill), which are bound by arithmetic;
- "reference": the jnp reference (every other platform).
The Pallas kernel does not multiply in FP8: the Pallas Triton lowering of jax 0.10-0.11 emits
`tt.dot` without `maxNumImpreciseAcc`, so Triton refuses Hopper's FP8 wgmma for a float32
accumulator and widens FP8 tiles to float16 for an Ampere `mma.sync` (checked on the PTX for
sm_90a, `tests/pallas_kernels/test_gpu_lowering.py`). Widening exactly to bf16 gives the same
products, and wgmma where tiles have 64 rows.

`Kp` may exceed x's K (a weight whose last K block is partial is zero-padded to whole groups);
x is zero-padded to match, which changes no product. Differentiable in x: the input gradient is
`d_out @ W` with W dequantized (activation quantization passes gradients straight through).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import on_cuda
from pallas_kernels.quantized_matmul import fp8_kernel, fp8_reference

IMPLEMENTATIONS = ("kernel", "interpret", "xla", "reference")


def _fp8_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a [M, B] . b [N, B]^T` on FP8 operands, float32 result."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def xla_fp8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """FP8 x FP8 products by XLA (the "xla" implementation above); `[M, N]` in x's dtype."""
    groups = scales.shape[0]
    width = x.shape[1] // groups
    q, x_scale = fp8_reference.quantize_activations(x, groups)
    scales = scales.astype(jnp.float32)
    if groups == 1:
        return (_fp8_dot(q, values) * x_scale * scales).astype(x.dtype)

    def group(g, acc):
        part = _fp8_dot(lax.dynamic_slice_in_dim(q, g * width, width, 1),
                        lax.dynamic_slice_in_dim(values, g * width, width, 1))
        return acc + part * lax.dynamic_slice_in_dim(x_scale, g, 1, 1) * lax.dynamic_slice_in_dim(scales, g, 1, 0)

    acc = lax.fori_loop(0, groups, group, jnp.zeros((x.shape[0], values.shape[0]), jnp.float32))
    return acc.astype(x.dtype)


def _cuda(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """The CUDA choice: the Pallas kernel where its decode tiles fit, XLA's FP8 GEMMs otherwise."""
    if fp8_kernel.fp8_config(x.shape[0], values.shape[1], values.shape[0], scales.shape[0]) is not None:
        return fp8_kernel.fp8_matmul(x, values, scales)
    return xla_fp8_matmul(x, values, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fp8(x, values, scales, implementation):
    if implementation == "reference":
        return fp8_reference.fp8_matmul(x, values, scales)
    if implementation == "auto":
        return on_cuda(_cuda, fp8_reference.fp8_matmul, x, values, scales)
    if implementation == "xla":
        return xla_fp8_matmul(x, values, scales)
    return fp8_kernel.fp8_matmul(x, values, scales, interpret=implementation == "interpret")


def _fp8_fwd(x, values, scales, implementation):
    return _fp8(x, values, scales, implementation), (values, scales)


def _fp8_bwd(implementation, residuals, d_out):
    values, scales = residuals
    return jnp.dot(d_out, fp8_reference.dequantize_fp8(values, scales, d_out.dtype)), None, None


_fp8.defvjp(_fp8_fwd, _fp8_bwd)


def fp8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """`x [..., K] @ W^T -> [..., N]`, W `values [N, Kp]` float8_e4m3fn times `scales [G, N]` per K group."""
    n, padded = values.shape
    depth = x.shape[-1]
    if (values.dtype != fp8_reference.FP8 or scales.ndim != 2 or scales.shape[1] != n or padded % scales.shape[0]
            or not padded - padded // scales.shape[0] < depth <= padded):
        raise ValueError(f"fp8_matmul: x {x.shape}, values {values.shape} {values.dtype}, scales {scales.shape}")
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"unknown fp8_matmul implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")
    rows = jnp.pad(x.reshape(-1, depth), ((0, 0), (0, padded - depth)))
    return _fp8(rows, values, scales, implementation or "auto").reshape(*x.shape[:-1], n)
