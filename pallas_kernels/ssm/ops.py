"""Public selective scan and chunked SSD: the Pallas kernels where they apply, else the jnp reference
(contracts in `reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`):
- "kernel": `triton_kernel.py` where the computation is lowered for CUDA, for channels in blocks
  of 64 and a power-of-two state size: calls without initial states (dense training rows and
  whole prompts; no states out: None) take `selective_scan_vjp`, differentiable through its
  backward kernel; calls with per-run `initial` states (the serving path: prefill chunks
  continuing from their slots) take `selective_scan_from_states`, forward only, which also
  returns the states after the runs;
- "interpret": the same kernels on the Pallas interpreter (any backend; for tests);
- "reference": the associative scan (every other platform, and the logged fallback).

`ssd_chunked` likewise: "kernel" (`ssd_kernel.py`) where lowered for CUDA, for rows from zero
states (dense training rows) or whose first run continues a given state (serving prefill chunks),
the state after each row's last token out either way, for whole blocks of the head dim
(`ssd_kernel.BLOCK_P`) and a power-of-two state size of 16 or more; "interpret"; "reference"
(everything else). Gradients through the kernel (x, dt, A, B, C, D and the state) come from its
backward kernels (`ssd_kernel.ssd_chunked_vjp`).

`ssd_chunked_states` (the ragged serving path: one flat row whose runs are the step's sequences,
run r continuing from `initial[:, r]`, runs past R from zeros; the states after each of the R runs
out, a run without tokens passing its state through) picks the same way, on the same shapes:
"kernel" is `ssd_kernel.ssd_from_states`, forward only.

The SSD kernels chunk by their own lengths (`ssd_kernel.CHUNK`, `BACKWARD_CHUNK`); `chunk` is the
reference's, and the result does not depend on either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.ssm import reference, ssd_kernel, triton_kernel

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _kernel_inputs(x, dt, segment_ids):
    dt, x = reference.identity_on_padding(dt.astype(jnp.float32), x.astype(jnp.float32), segment_ids)
    keep = 1.0 - reference.run_starts(segment_ids).astype(jnp.float32)
    return x, dt, keep


def _kernel(x, dt, A, B, C, D, segment_ids, interpret=False):
    x, dt, keep = _kernel_inputs(x, dt, segment_ids)
    return triton_kernel.selective_scan_vjp(x, dt, A, B, C, D, keep, interpret)


def _states_kernel(x, dt, A, B, C, D, segment_ids, initial, interpret=False):
    dt, x = reference.identity_on_padding(dt.astype(jnp.float32), x.astype(jnp.float32), segment_ids)
    return triton_kernel.selective_scan_from_states(x, dt, A, B, C, D, reference.run_ids(segment_ids), initial,
                                                    interpret=interpret)


def _scan(x, dt, A, B, C, D, segment_ids, initial, implementation):
    args = (x, dt, A, B, C, D, segment_ids)
    if initial is not None:
        if implementation == "auto":
            return on_cuda(_states_kernel, reference.selective_scan, *args, initial)
        return _states_kernel(*args, initial, interpret=implementation == "interpret")
    if implementation == "auto":
        return on_cuda(_kernel, lambda *a: reference.selective_scan(*a)[0], *args), None
    return _kernel(*args, interpret=implementation == "interpret"), None


def _check(op: str, implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown {op} implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")


def selective_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                   segment_ids: jax.Array, initial: jax.Array | None = None, *,
                   implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.selective_scan`'s contract: (`y`, the states after each of the R runs `initial` starts; None
    without `initial`). Gradients only without `initial` through the kernels."""
    _check("selective_scan", implementation)
    if implementation == "reference":
        return reference.selective_scan(x, dt, A, B, C, D, segment_ids, initial)
    if implementation is None:
        if not triton_kernel.supported(x.shape[-1], A.shape[-1]):
            warn_fallback("selective_scan", f"{x.shape[-1]} channels, state {A.shape[-1]} "
                                            f"(blocks of {triton_kernel.BLOCK_D}, a power-of-two state)")
            return reference.selective_scan(x, dt, A, B, C, D, segment_ids, initial)
        implementation = "auto"
    return _scan(x, dt, A, B, C, D, segment_ids, initial, implementation)


def _zero_before_first_run(y, segment_ids):
    """The kernels' states pass left padding unread; the reference's first run starts at its first real token, and
    padding before it reads no state (y = 0 there, as it is from a zero state)."""
    return jnp.where((jnp.cumsum(segment_ids != 0, axis=1) == 0)[..., None, None], 0.0, y)


def _ssd_kernel(x, dt, A, B, C, D, segment_ids, state=None, interpret=False):
    dt, x = reference.identity_on_padding(dt.astype(jnp.float32), x.astype(jnp.float32), segment_ids)
    f32 = jnp.float32
    initial = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), f32) if state is None else state.astype(f32)
    y, final = ssd_kernel.ssd_chunked_vjp(x, dt, A, B, C, D, reference.run_ids(segment_ids), initial,
                                          ssd_kernel.CHUNK, ssd_kernel.BACKWARD_CHUNK, interpret)
    return (y if state is None else _zero_before_first_run(y, segment_ids)), final


def _ssd_states_kernel(x, dt, A, B, C, D, segment_ids, initial, interpret=False):
    dt, x = reference.identity_on_padding(dt.astype(jnp.float32), x.astype(jnp.float32), segment_ids)
    y, finals = ssd_kernel.ssd_from_states(x, dt, A, B, C, D, reference.run_ids(segment_ids), initial,
                                           chunk=ssd_kernel.CHUNK, interpret=interpret)
    return _zero_before_first_run(y, segment_ids), finals


def _ssd_dispatch(op: str, kernel, on_reference, x, B, args, implementation):
    """`kernel(*args)` or `on_reference(*args)` by `implementation` (the module docstring)."""
    _check(op, implementation)
    if implementation == "reference":
        return on_reference(*args)
    if implementation is None:
        if not ssd_kernel.supported(x.shape[-1], B.shape[-1]):
            warn_fallback(op, f"head dim {x.shape[-1]}, state {B.shape[-1]} (head dim in blocks of "
                              f"{ssd_kernel.BLOCK_P}, a power-of-two state >= 16)")
            return on_reference(*args)
        return on_cuda(kernel, on_reference, *args)
    return kernel(*args, interpret=implementation == "interpret")


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                segment_ids: jax.Array, chunk: int, state: jax.Array | None = None, *,
                implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`reference.ssd_chunked`'s contract (`y`, the state after each row's last token)."""
    args = (x, dt, A, B, C, D, segment_ids) + (() if state is None else (state,))

    def on_reference(*a):
        return reference.ssd_chunked(*a[:7], chunk, *a[7:])

    return _ssd_dispatch("ssd_chunked", _ssd_kernel, on_reference, x, B, args, implementation)


def ssd_chunked_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                       segment_ids: jax.Array, chunk: int, initial: jax.Array, *,
                       implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`reference.ssd_chunked_states`' contract (`y`, the states after each of the R runs `initial [B, R, H, P, N]`
    starts). Forward only through the kernel."""

    def on_reference(*a):
        return reference.ssd_chunked_states(*a[:7], chunk, a[7])

    return _ssd_dispatch("ssd_chunked_states", _ssd_states_kernel, on_reference, x, B,
                         (x, dt, A, B, C, D, segment_ids, initial), implementation)
