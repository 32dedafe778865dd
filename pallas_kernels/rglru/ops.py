"""Public RG-LRU scan: the Pallas kernels where they apply, else the jnp reference (contract in `reference.py`).

Implementations, picked by `implementation` or, when it is None, by lowering platform and shape
(`pallas_kernels.dispatch.on_cuda`), for channels in blocks of `BLOCK_D`:
- "kernel": `triton_kernel.py` where the computation is lowered for CUDA: calls without initial
  states (dense training rows and whole prompts; no states out: None) take `linear_scan`,
  differentiable (below); calls with per-run `initial` states (the serving path: a flat row of
  prefill chunks and decode tokens continuing from their slots) take `rglru_from_states`, forward
  only, which also returns the states after the runs;
- "interpret": the same kernels on the Pallas interpreter (any backend; for tests);
- "reference": the associative scan (every other platform, and the logged fallback).
Gradients (without `initial`): the recurrence's backward is the same recurrence run from the end
(dh_t = g_t + decay_{t+1} dh_{t+1}; d inputs = dh, d decay_t = dh_t h_{t-1}), so the kernel serves
both passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import on_cuda, warn_fallback
from pallas_kernels.rglru import reference, triton_kernel

IMPLEMENTATIONS = ("kernel", "interpret", "reference")


def _run(decay: jax.Array, inputs: jax.Array, implementation: str, reverse: bool = False) -> jax.Array:
    """The plain recurrence (`reference.plain_scan`) by `implementation`, optionally from the last token."""

    def kernel(decay, inputs, interpret=False):
        return triton_kernel.linear_scan(decay, inputs, reverse=reverse, interpret=interpret)

    def ref(decay, inputs):
        if not reverse:
            return reference.plain_scan(decay, inputs)
        return jnp.flip(reference.plain_scan(jnp.flip(decay, 1), jnp.flip(inputs, 1)), 1)

    if implementation == "auto":
        return on_cuda(kernel, ref, decay, inputs)
    return kernel(decay, inputs, interpret=implementation == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scan(decay: jax.Array, inputs: jax.Array, implementation: str) -> jax.Array:
    return _run(decay, inputs, implementation)


def _scan_fwd(decay, inputs, implementation):
    states = _run(decay, inputs, implementation)
    return states, (decay, states)


def _scan_bwd(implementation, residuals, d_states):
    decay, states = residuals
    next_decay = jnp.concatenate([decay[:, 1:], jnp.zeros_like(decay[:, :1])], axis=1).astype(jnp.float32)
    d_h = _run(next_decay, d_states, implementation, reverse=True)
    previous = jnp.concatenate([jnp.zeros_like(states[:, :1]), states[:, :-1]], axis=1)
    return (d_h * previous).astype(decay.dtype), d_h


_scan.defvjp(_scan_fwd, _scan_bwd)


def _states_kernel(decay, inputs, segment_ids, initial, interpret=False):
    decay, inputs = reference.identity_on_padding(decay, inputs, segment_ids)
    # Run -1 before the row's first real token: the reference's state is 0 there, not run 0's initial state.
    runs = jnp.where(jnp.cumsum(segment_ids != 0, axis=1) == 0, -1, reference.run_ids(segment_ids))
    return triton_kernel.rglru_from_states(decay, inputs, runs, initial, interpret=interpret)


def linear_scan(decay: jax.Array, inputs: jax.Array, segment_ids: jax.Array, initial: jax.Array | None = None, *,
                implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.linear_scan`'s contract: (the state after every token, after each of the R runs `initial` starts;
    None without `initial`). Gradients only without `initial` through the kernels."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown linear_scan implementation {implementation!r}; supported: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "reference":
        return reference.linear_scan(decay, inputs, segment_ids, initial)
    if implementation is None:
        if not triton_kernel.supported(decay.shape[-1]):
            warn_fallback("rglru linear_scan", f"{decay.shape[-1]} channels (blocks of {triton_kernel.BLOCK_D})")
            return reference.linear_scan(decay, inputs, segment_ids, initial)
        implementation = "auto"
    if initial is not None:
        args = (decay, inputs, segment_ids, initial)
        if implementation == "auto":
            return on_cuda(_states_kernel, reference.linear_scan, *args)
        return _states_kernel(*args, interpret=implementation == "interpret")
    return _scan(*reference.scan_operands(decay, inputs, segment_ids), implementation), None


def rg_lru(x: jax.Array, input_gate: jax.Array, recurrent_gate: jax.Array, a_param: jax.Array, reset: jax.Array,
           segment_ids: jax.Array, initial: jax.Array | None = None, *,
           implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """`reference.rg_lru`'s contract, its scan through `linear_scan`."""
    decay, inputs = reference.gate_inputs(x, input_gate, recurrent_gate, a_param, reset)
    return linear_scan(decay, inputs, segment_ids, initial, implementation=implementation)
