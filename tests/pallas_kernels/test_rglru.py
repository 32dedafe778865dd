"""The RG-LRU reference (`pallas_kernels/rglru/reference.py`) against its per-token step, and the
Pallas kernels (interpret mode) against the reference: values and gradients from zero states, values
and final states from per-run initial states (the serving path).

Rows mix packed sequences and left/right padding; the first R = 2 runs of each row start from
random initial states, which a run continues unless its first token is at position 0 (reset).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import rglru
from pallas_kernels.rglru import reference, triton_kernel

# Row 0: a continued sequence (positions 5..10), then a fresh packed one, then right padding.
# Row 1: left padding, one continued sequence.
# Row 2: a fresh sequence (its initial state must not matter), a continued one, a fresh one.
SEGMENTS = np.array([[1] * 6 + [2] * 5 + [0] * 2, [0] * 3 + [1] * 10, [1] * 4 + [2] * 1 + [3] * 8], np.int32)
FIRST_POSITION = {(0, 1): 5, (0, 2): 0, (1, 1): 7, (2, 1): 0, (2, 2): 3, (2, 3): 0}  # (row, segment) -> position
B, T = SEGMENTS.shape
D, R = 64, 2  # channels (two kernel blocks), runs with an initial state


def _positions(segments: np.ndarray = SEGMENTS, first_position: dict = FIRST_POSITION) -> np.ndarray:
    positions = np.zeros(segments.shape, np.int32)
    for row in range(segments.shape[0]):
        for segment in set(segments[row]) - {0}:
            tokens = np.flatnonzero(segments[row] == segment)
            positions[row, tokens] = first_position[row, segment] + np.arange(len(tokens))
    return positions


def _operands(seed: int, rows: int = B, length: int = T, runs: int = R):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (rows, length, D))
    input_gate, recurrent_gate = (jax.nn.sigmoid(jax.random.normal(k, (rows, length, D))) for k in keys[1:3])
    a_param = jax.random.normal(keys[3], (D,))
    initial = jax.random.normal(keys[4], (rows, runs, D))
    return x, input_gate, recurrent_gate, a_param, initial


def test_scan_equals_the_step_run_token_by_token():
    x, input_gate, recurrent_gate, a_param, initial = _operands(0)
    positions, segments = _positions(), jnp.asarray(SEGMENTS)
    reset = (positions == 0) & (SEGMENTS != 0)
    y, finals = jax.jit(rglru.rg_lru)(x, input_gate, recurrent_gate, a_param, reset, segments, initial)
    step = jax.jit(rglru.rg_lru_step)
    for row in range(B):
        order = [s for i, s in enumerate(SEGMENTS[row]) if s and s not in SEGMENTS[row][:i]]
        for run, segment in enumerate(order):
            state = initial[row, run][None] if run < R else jnp.zeros((1, D))
            for t in np.flatnonzero(SEGMENTS[row] == segment):
                out, state = step(x[row, t][None], input_gate[row, t][None], recurrent_gate[row, t][None], a_param,
                                  jnp.asarray(reset[row, t])[None], state)
                np.testing.assert_allclose(y[row, t], out[0], rtol=1e-5, atol=1e-5)
            if run < R:
                np.testing.assert_allclose(finals[row, run], state[0], rtol=1e-5, atol=1e-5)
    # A run that starts fresh ignores its initial state.
    assert reset[2, 0] and not np.allclose(initial[2, 0], 0.0)


@pytest.mark.parametrize("seed", [1])
def test_kernel_equals_reference_values_and_gradients(seed):
    x, input_gate, recurrent_gate, a_param, _ = _operands(seed)
    segments = jnp.asarray(SEGMENTS)
    reset = jnp.asarray((_positions() == 0) & (SEGMENTS != 0))
    weights = jax.random.normal(jax.random.PRNGKey(seed + 10), (B, T, D))

    def loss(implementation):
        def f(x, input_gate, recurrent_gate, a_param):
            y, _ = rglru.rg_lru(x, input_gate, recurrent_gate, a_param, reset, segments, implementation=implementation)
            return jnp.sum(y * weights), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    args = (x, input_gate, recurrent_gate, a_param)
    (_, y_kernel), grads_kernel = loss("interpret")(*args)
    (_, y_ref), grads_ref = loss("reference")(*args)
    np.testing.assert_allclose(y_kernel, y_ref, rtol=1e-5, atol=1e-5)
    for name, ours, ref in zip(("x", "input_gate", "recurrent_gate", "a_param"), grads_kernel, grads_ref):
        scale = float(jnp.abs(ref).max())
        assert scale > 0 and float(jnp.abs(ours - ref).max()) <= 1e-5 * max(1.0, scale), name


# From states (`triton_kernel.rglru_from_states`): (segment ids, first position of each (row, segment), runs with an
# initial state). "packed": the rows above (left and right padding, a fresh run ignoring its state, a run past R).
# "serving": a flat step (decode tokens as one-token runs at positions > 0, fresh and continued prefill chunks,
# trailing padding, slots 6 and 7 without tokens) and a row without tokens.
SERVING = np.array([[1] + [2] * 11 + [3] + [4] * 3 + [5] * 14 + [6] + [0] * 5, [0] * 36], np.int32)
STATE_CASES = {
    "packed": (SEGMENTS, FIRST_POSITION, R),
    "serving": (SERVING, {(0, 1): 9, (0, 2): 0, (0, 3): 4, (0, 4): 12, (0, 5): 0, (0, 6): 30}, 8),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_kernel_from_states_matches_reference(case):
    segments, first_position, runs = STATE_CASES[case]
    x, input_gate, recurrent_gate, a_param, initial = _operands(2, *segments.shape, runs)
    reset = jnp.asarray((_positions(segments, first_position) == 0) & (segments != 0))
    args = (x, input_gate, recurrent_gate, a_param, reset, jnp.asarray(segments))
    kernel = jax.jit(functools.partial(rglru.rg_lru, implementation="interpret"))
    on_reference = jax.jit(functools.partial(rglru.rg_lru, implementation="reference"))
    got, want, zero = kernel(*args, initial), on_reference(*args, initial), on_reference(*args, jnp.zeros_like(initial))
    for name, ours, ref, from_zero in zip(("y", "finals"), got, want, zero):
        error, scale, ignored = (float(jnp.abs(a - b).max()) for a, b in ((ours, ref), (ref, 0), (from_zero, ref)))
        print(f"{case} {name}: max abs diff {error:.2e}, max abs value {scale:.2f}, from zero states {ignored:.2f}")
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=name)
        # A kernel that ignored the initial states would fail the bound above by far.
        assert ignored > 1e3 * 1e-5, name
    absent = np.asarray(reference.run_bounds(jnp.asarray(segments), runs)[2]) < 0  # runs without tokens
    assert absent.any()
    np.testing.assert_array_equal(np.asarray(got[1])[absent], np.asarray(initial)[absent])  # passed through
    with pytest.raises(ValueError, match="initial states"):
        kernel(*args, initial[..., :triton_kernel.BLOCK_D])


def test_kernel_refuses_partial_blocks_and_ops_names_implementations():
    with pytest.raises(ValueError, match="multiple of 32"):
        triton_kernel.linear_scan(jnp.ones((1, 4, 48)), jnp.ones((1, 4, 48)))
    with pytest.raises(ValueError, match="unknown linear_scan implementation 'gpu'"):
        rglru.linear_scan(jnp.ones((1, 4, 32)), jnp.ones((1, 4, 32)), jnp.ones((1, 4), jnp.int32), implementation="gpu")
    # Channels the kernel cannot tile fall back to the reference (with a logged warning).
    ones = jnp.ones((1, 4, 48))
    states, _ = rglru.linear_scan(ones * 0.5, ones, jnp.ones((1, 4), jnp.int32))
    np.testing.assert_allclose(states[0, :, 0], [1.0, 1.5, 1.75, 1.875])
