"""RecurrentGemma's RG-LRU (Griffin's real-gated linear recurrent unit) in plain jnp.

The definition of correct and the CPU path. Rows `[B, T, D]` may hold several sequences
(packed training rows) or sequences continuing from states (a flat serving batch), with the
conventions of `pallas_kernels/ssm/reference.py`: `segment_ids` (0 = padding, an identity step),
one *run* per sequence (`run_ids`), the first R runs starting from given initial states
`[B, R, D]` (zeros otherwise) and the states after those runs returned in the same layout.

Per channel, with gates already through their sigmoid:

    log a_t = -8 * recurrent_gate_t * softplus(a_param)
    x'_t    = x_t * input_gate_t * (1 if reset_t else sqrt(1 - a_t^2))
    h_t     = (0 if reset_t else a_t) * h_{t-1} + x'_t,     y_t = h_t

`reset_t` marks a sequence's first token (position 0): the state restarts and the input skips
the sqrt(1 - a^2) normalisation, as transformers' `RecurrentGemmaRglru` does. A run whose first
token is not at position 0 continues its initial state.

Glossary: B rows, T tokens, D channels (lru_width), R runs with a state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ssm.reference import run_ids, run_starts

# The log-decay scale Griffin fixes (`c` in the paper).
LOG_DECAY_SCALE = -8.0


def gate_inputs(
    x: jax.Array, input_gate: jax.Array, recurrent_gate: jax.Array, a_param: jax.Array, reset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The recurrence's decay and input (float32, `[..., D]` each) from the gated activations.

    `reset [...]` bool: the decay is 0 there and the input is not normalised.
    """
    f32 = jnp.float32
    log_a = LOG_DECAY_SCALE * recurrent_gate.astype(f32) * jax.nn.softplus(a_param.astype(f32))
    reset = reset[..., None]
    multiplier = jnp.where(reset, 1.0, jnp.sqrt(1.0 - jnp.exp(2.0 * log_a)))
    inputs = x.astype(f32) * input_gate.astype(f32) * multiplier
    return jnp.where(reset, 0.0, jnp.exp(log_a)), inputs


def run_bounds(segment_ids: jax.Array, num_runs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(runs `[B, T]`, each run's first real token `[B, T]` bool, last real token of each of the
    first `num_runs` runs `[B, R]`, -1 for a run without tokens)."""
    real = segment_ids != 0
    runs = run_ids(segment_ids)
    begins = real & (run_starts(segment_ids) | (jnp.cumsum(real, axis=1) == 1))
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    mine = real[..., None] & (runs[..., None] == jnp.arange(num_runs)[None, None, :])  # [B, T, R]
    last = jnp.max(jnp.where(mine, index[None, :, None], -1), axis=1)
    return runs, begins, last


def identity_on_padding(decay: jax.Array, inputs: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(decay, inputs) float32 `[B, T, D]` with padding an identity step (decay 1, input 0)."""
    real = (segment_ids != 0)[..., None]
    return jnp.where(real, decay.astype(jnp.float32), 1.0), jnp.where(real, inputs.astype(jnp.float32), 0.0)


def scan_operands(
    decay: jax.Array, inputs: jax.Array, segment_ids: jax.Array, initial: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`linear_scan`'s operands as one plain recurrence over T (float32 `[B, T, D]` each): padding an
    identity step (decay 1, input 0), each run's first token cut from the state before it (decay 0)
    and starting from the run's initial state (folded into its input)."""
    f32 = jnp.float32
    decay, inputs = identity_on_padding(decay, inputs, segment_ids)
    num_runs = 1 if initial is None else initial.shape[1]
    runs, begins, _ = run_bounds(segment_ids, num_runs)
    begins = begins[..., None]
    if initial is not None:
        picked = jnp.take_along_axis(initial.astype(f32), jnp.minimum(runs, num_runs - 1)[..., None], axis=1)
        entering = jnp.where((runs < num_runs)[..., None], picked, 0.0)  # [B, T, D] the state before each run
        inputs = inputs + jnp.where(begins, decay * entering, 0.0)
    return jnp.where(begins, 0.0, decay), inputs


def plain_scan(decay: jax.Array, inputs: jax.Array) -> jax.Array:
    """h_t = decay_t * h_{t-1} + inputs_t along axis 1 from h = 0, as an associative scan (float32)."""

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    return jax.lax.associative_scan(combine, (decay.astype(jnp.float32), inputs.astype(jnp.float32)), axis=1)[1]


def linear_scan(
    decay: jax.Array, inputs: jax.Array, segment_ids: jax.Array, initial: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """h_t = decay_t * h_{t-1} + inputs_t along T (`[B, T, D]`), per run, as an associative scan.

    Each run starts from its initial state (`initial [B, R, D]`; zeros past R or without it);
    padding is an identity step. Returns the state after every token `[B, T, D]` (float32) and
    after each of the R runs (`[B, R, D]`; the initial state for a run without tokens; None
    without `initial`).
    """
    states = plain_scan(*scan_operands(decay, inputs, segment_ids, initial))
    if initial is None:
        return states, None
    _, _, last = run_bounds(segment_ids, initial.shape[1])
    finals = jnp.take_along_axis(states, jnp.maximum(last, 0)[..., None], axis=1)
    return states, jnp.where((last >= 0)[..., None], finals, initial.astype(jnp.float32))


def rg_lru(x: jax.Array, input_gate: jax.Array, recurrent_gate: jax.Array, a_param: jax.Array, reset: jax.Array,
           segment_ids: jax.Array, initial: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """The RG-LRU over rows: `x`, gates `[B, T, D]`, `a_param [D]`, `reset`, `segment_ids [B, T]`.

    Returns (`y [B, T, D]` float32, the states after each of the R runs of `initial [B, R, D]`,
    None without it).
    """
    decay, inputs = gate_inputs(x, input_gate, recurrent_gate, a_param, reset)
    return linear_scan(decay, inputs, segment_ids, initial)


def rg_lru_step(
    x: jax.Array, input_gate: jax.Array, recurrent_gate: jax.Array, a_param: jax.Array, reset: jax.Array,
    state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One token per row: `x`, gates `[B, D]`, `reset [B]`, `state [B, D]` -> (`y [B, D]`, new state), float32."""
    decay, inputs = gate_inputs(x, input_gate, recurrent_gate, a_param, reset)
    state = decay * state.astype(jnp.float32) + inputs
    return state, state
