"""The scan references (`pallas_kernels/ssm/reference.py`) against their own per-token recurrences.

Rows mix packed sequences and left/right padding; the first R = 2 runs of each row continue
from random initial states, later ones start fresh. The step functions, run token by token
per sequence, are the oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ssm

# Row 0: continues its initial state, then a packed second sequence, then right padding.
# Row 1: left padding, one sequence (which continues the row's state: padding is identity).
# Row 2: three packed sequences, no padding.
SEGMENTS = np.array(
    [[1] * 6 + [2] * 5 + [0] * 2, [0] * 3 + [1] * 10, [1] * 4 + [2] * 1 + [3] * 8], np.int32
)
B, T = SEGMENTS.shape
R = 2  # runs with an initial state


def _start(initial, row: int, run: int):
    """The oracle's state entering run `run` of `row` (`[1, ...]`)."""
    return initial[row, run][None] if run < initial.shape[1] else jnp.zeros_like(initial[row, 0][None])


def _sequences(row: int) -> list[tuple[int, list[int]]]:
    """(segment id, token indices) per sequence of the row, in order."""
    ids = SEGMENTS[row]
    out: list[tuple[int, list[int]]] = []
    for t, s in enumerate(ids):
        if s == 0:
            continue
        if not out or out[-1][0] != s:
            out.append((int(s), []))
        out[-1][1].append(t)
    return out


# The oracles, compiled once each (eager dispatch per token dominates otherwise), and the scans under test,
# compiled whole (op by op, each operation compiles apart).
conv1d_step = jax.jit(ssm.conv1d_step)
selective_state_step = jax.jit(ssm.selective_state_step)
ssd_state_step = jax.jit(ssm.ssd_state_step)
causal_conv1d = jax.jit(ssm.causal_conv1d)
selective_scan = jax.jit(ssm.selective_scan)
ssd_scan = jax.jit(ssm.ssd_scan)
ssd_chunked_states = jax.jit(ssm.ssd_chunked_states, static_argnums=7)
ssd_chunked = jax.jit(ssm.ssd_chunked, static_argnums=7)


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def test_run_ids():
    runs = np.asarray(ssm.run_ids(jnp.asarray(SEGMENTS)))
    np.testing.assert_array_equal(runs[0], [0] * 6 + [1] * 7)
    np.testing.assert_array_equal(runs[1], [0] * 13)
    np.testing.assert_array_equal(runs[2], [0] * 4 + [1] + [2] * 8)


def test_causal_conv1d_matches_steps():
    C, W = 5, 4
    x, weight, bias = _normal(0, (B, T, C)), _normal(1, (C, W)), _normal(2, (C,))
    tails = _normal(3, (B, R, W - 1, C))
    out, new_tails = causal_conv1d(x, weight, bias, jnp.asarray(SEGMENTS), tails)
    for row in range(B):
        for run, (_, tokens) in enumerate(_sequences(row)):
            state = _start(tails, row, run)
            for t in tokens:
                y, state = conv1d_step(x[row : row + 1, t], weight, bias, state)
                np.testing.assert_allclose(out[row, t], y[0], rtol=1e-5, atol=1e-5)
            if run < R:
                np.testing.assert_allclose(new_tails[row, run], state[0], rtol=1e-6, atol=1e-6)


def test_selective_scan_matches_steps():
    D, N = 6, 4
    x = _normal(0, (B, T, D))
    dt = jax.nn.softplus(_normal(1, (B, T, D)))
    A = -jnp.exp(_normal(2, (D, N), 0.5))
    Bm, Cm = _normal(3, (B, T, N)), _normal(4, (B, T, N))
    Dv, h0 = _normal(5, (D,)), _normal(6, (B, R, D, N))
    y, finals = selective_scan(x, dt, A, Bm, Cm, Dv, jnp.asarray(SEGMENTS), h0)
    for row in range(B):
        for run, (_, tokens) in enumerate(_sequences(row)):
            h = _start(h0, row, run)
            for t in tokens:
                out, h = selective_state_step(x[row : row + 1, t], dt[row : row + 1, t], A, Bm[row : row + 1, t],
                                                  Cm[row : row + 1, t], Dv, h)
                np.testing.assert_allclose(y[row, t], out[0], rtol=1e-4, atol=1e-4)
            if run < R:
                np.testing.assert_allclose(finals[row, run], h[0], rtol=1e-4, atol=1e-4)


# (scan, chunk): the associative `ssd_scan`; `ssd_chunked_states` (per-run states, the serving path)
# with chunks that split runs (4) and that hold several (8, 16: row 2 in one chunk); `ssd_chunked`
# (only run 0 continues a state there: R = 1; the state after the row's last run comes back).
@pytest.mark.parametrize("scan, chunk", [("associative", None), ("chunked_states", 4), ("chunked_states", 8),
                                         ("chunked_states", 16), ("chunked", 4)])
def test_ssd_matches_steps(scan, chunk):
    H, P, G, N = 4, 3, 2, 5
    x = _normal(0, (B, T, H, P))
    dt = jax.nn.softplus(_normal(1, (B, T, H)))
    A = -jnp.exp(_normal(2, (H,), 0.5))
    Bm, Cm = _normal(3, (B, T, G, N)), _normal(4, (B, T, G, N))
    Dv = _normal(5, (H,))
    segments = jnp.asarray(SEGMENTS)
    h0 = _normal(6, (B, 1 if scan == "chunked" else R, H, P, N))
    if scan == "associative":
        y, finals = ssd_scan(x, dt, A, Bm, Cm, Dv, segments, h0)
    elif scan == "chunked_states":
        y, finals = ssd_chunked_states(x, dt, A, Bm, Cm, Dv, segments, chunk, h0)
    else:
        y, last = ssd_chunked(x, dt, A, Bm, Cm, Dv, segments, chunk, h0[:, 0])
    for row in range(B):
        sequences = _sequences(row)
        for run, (_, tokens) in enumerate(sequences):
            h = _start(h0, row, run)
            for t in tokens:
                out, h = ssd_state_step(x[row : row + 1, t], dt[row : row + 1, t], A, Bm[row : row + 1, t],
                                            Cm[row : row + 1, t], Dv, h)
                np.testing.assert_allclose(y[row, t], out[0], rtol=1e-4, atol=1e-4)
            if scan != "chunked" and run < R:
                np.testing.assert_allclose(finals[row, run], h[0], rtol=1e-4, atol=1e-4)
            if scan == "chunked" and run == len(sequences) - 1:
                np.testing.assert_allclose(last[row], h[0], rtol=1e-4, atol=1e-4)
        if scan != "chunked" and len(sequences) < R:  # a run without tokens keeps its state
            np.testing.assert_allclose(finals[row, len(sequences)], h0[row, len(sequences)], rtol=1e-6)


def test_gated_rms_norm_groups():
    x, gate, weight = _normal(0, (2, 8)), _normal(1, (2, 8)), _normal(2, (8,))
    out = ssm.gated_rms_norm(x, gate, weight, group_size=4, eps=1e-5)
    h = np.asarray(x * jax.nn.silu(gate)).reshape(2, 2, 4)
    ref = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref.reshape(2, 8) * np.asarray(weight), rtol=1e-5, atol=1e-6)


def test_selective_scan_kernel_matches_reference_in_interpret_mode():
    """The Pallas kernel (on the interpreter) over packed and padded rows, two channel blocks; its
    gradients (the backward kernel) with respect to every input equal the reference's."""
    from pallas_kernels.ssm import reference

    D, N = 128, 16
    x = _normal(0, (B, T, D))
    dt = jax.nn.softplus(_normal(1, (B, T, D)))
    A = -jnp.exp(_normal(2, (D, N), 0.5))
    Bm, Cm, Dv = _normal(3, (B, T, N)), _normal(4, (B, T, N)), _normal(5, (D,))
    segments = jnp.asarray(SEGMENTS)
    real = (SEGMENTS != 0)[..., None]

    def loss(scan, *args):
        y = scan(*args, segments)[0]
        return jnp.sum(jnp.where(real, y, 0.0) ** 2), y

    kernel = functools.partial(ssm.selective_scan, implementation="interpret")
    inputs = (x, dt, A, Bm.astype(jnp.bfloat16), Cm.astype(jnp.bfloat16), Dv)  # B, C as the mixer passes them
    every = tuple(range(len(inputs)))
    (_, got), got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=every, has_aux=True))(*inputs)
    (_, want), want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, reference.selective_scan), argnums=every,
                                               has_aux=True))(*inputs)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-4, atol=1e-4)
    for g, w, a in zip(got_grads, want_grads, inputs):
        assert g.dtype == a.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-4, atol=1e-4)


# The kernel from per-run initial states (the serving path) in interpret mode: (segment ids [B, T], runs with a
# state R). "packed": the rows above (row 1's second state passes through, row 2's third run starts from zeros);
# "serving": a flat ragged step as `_Mixer.serve` builds it (single-token runs beside prefill chunks, padding at
# the end, two slots without tokens).
SCAN_STATE_CASES = {
    "packed": (SEGMENTS, R),
    "serving": (np.array([[1] + [2] * 11 + [3] + [4] * 3 + [5] * 14 + [6] + [0] * 5], np.int32), 8),
}


def _assert_from_states(case: str, compared, segments, h0) -> None:
    """A state kernel's (name, got, want, want from zero states) against the reference: equal within the bound, far
    from what ignoring the initial states gives; the finals `compared[-1]` of runs without tokens are their
    initial states `h0 [B, R, ...]`."""
    for name, got, want, zero in compared:
        got, want, zero = (np.asarray(a, np.float32) for a in (got, want, zero))
        error, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
        print(f"{case} {name}: max abs diff {error:.2e}, max abs value {scale:.2f}")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)
        # A kernel that ignored the initial states would fail the bound above by far.
        assert float(np.max(np.abs(zero - want))) > 1e3 * 1e-4, name
    runs = h0.shape[1]
    absent = np.arange(runs)[None, :] > np.asarray(ssm.run_ids(segments)).max(axis=1)[:, None]  # runs without tokens
    assert absent.any()
    np.testing.assert_array_equal(np.asarray(compared[-1][1])[absent], np.asarray(h0)[absent])  # passed through


@pytest.mark.parametrize("case", sorted(SCAN_STATE_CASES))
def test_selective_scan_kernel_from_states_matches_reference(case):
    from pallas_kernels.ssm import reference

    segments, runs = SCAN_STATE_CASES[case]
    b, t = segments.shape
    D, N = 128, 16  # two channel blocks
    x = _normal(10, (b, t, D))
    dt = jax.nn.softplus(_normal(11, (b, t, D)))
    A = -jnp.exp(_normal(12, (D, N), 0.5))
    Bm, Cm, Dv = _normal(13, (b, t, N)), _normal(14, (b, t, N)), _normal(15, (D,))
    h0 = _normal(16, (b, runs, D, N))
    segments = jnp.asarray(segments)
    kernel = jax.jit(functools.partial(ssm.selective_scan, implementation="interpret"))
    y, finals = kernel(x, dt, A, Bm.astype(jnp.bfloat16), Cm.astype(jnp.bfloat16), Dv, segments, h0)
    want_y, want_finals = selective_scan(x, dt, A, Bm.astype(jnp.bfloat16), Cm.astype(jnp.bfloat16), Dv, segments, h0)
    zero_y, zero_finals = selective_scan(x, dt, A, Bm.astype(jnp.bfloat16), Cm.astype(jnp.bfloat16), Dv, segments,
                                         jnp.zeros_like(h0))
    real = (np.asarray(segments) != 0)[..., None]
    _assert_from_states(case, (("y", np.where(real, y, 0), np.where(real, want_y, 0), np.where(real, zero_y, 0)),
                               ("finals", finals, want_finals, zero_finals)), segments, h0)
    with pytest.raises(ValueError, match="initial states"):
        kernel(x, dt, A, Bm, Cm, Dv, segments, h0[..., :8])


# The SSD kernels (`ssd_kernel.py`) on the interpreter against the reference, y, the final state and the gradients
# of every input: (segment ids [B, T], H, P, G, N, forward chunk, backward chunk, initial state). "packed-groups":
# dense rows (zero states) whose runs cross chunk edges and share chunks, left and right padding, two heads per
# group of B/C, two blocks of the head dim, 40 tokens; "state-short-runs": test_ssm's rows (a one-token run, three
# runs in a row, 13 tokens: a padded last chunk), each row's first run from a random state (a serving prefill
# chunk), one group for two heads, chunks of 8 and 4. Slow: "mamba2-head" at Mamba-2's head (P = 64, N = 128) and the
# kernels' own chunks (32 and 16), from states, 100 tokens over three runs.
SSD_KERNEL_CASES = {
    "packed-groups": (np.array([[1] * 20 + [2] * 7 + [3] * 10 + [0] * 3, [0] * 5 + [1] * 35]), 4, 64, 2, 16, 16, 8,
                      False),
    "state-short-runs": (SEGMENTS, 2, 32, 1, 16, 8, 4, True),
    "mamba2-head": (np.array([[0] * 3 + [1] * 45 + [2] * 20 + [3] * 30 + [0] * 2]), 2, 64, 1, 128, 32, 16, True),
}
SLOW_SSD_KERNEL_CASES = ("mamba2-head",)
SSD_GRADIENTS = ("dx", "ddt", "dA", "dB", "dC", "dD", "d_state")


def _ssd_with_grads(segments: np.ndarray, heads: int, head_dim: int, groups: int, state: int, with_state: bool):
    """fn -> (fn's (y, final state), its VJP (dx, ddt, dA, dB, dC, dD[, d_state]) for random cotangents), jitted,
    at random inputs; fn takes `ops.ssd_chunked`'s arguments up to D, then the initial state `with_state`."""
    rows, length = segments.shape
    x = _normal(0, (rows, length, heads, head_dim))
    dt = jax.nn.softplus(_normal(1, (rows, length, heads)))
    A = -jnp.exp(_normal(2, (heads,), 0.5))
    Bm, Cm = _normal(3, (rows, length, groups, state)), _normal(4, (rows, length, groups, state))
    Dv = _normal(5, (heads,))
    h0 = (_normal(6, (rows, heads, head_dim, state)),) if with_state else ()
    cotangents = _normal(7, (rows, length, heads, head_dim)), _normal(8, (rows, heads, head_dim, state))

    def with_grads(fn):
        @jax.jit
        def run(*inputs):
            outputs, vjp = jax.vjp(fn, *inputs)
            return outputs, vjp(cotangents)
        return run(x, dt, A, Bm, Cm, Dv, *h0)

    return with_grads


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_SSD_KERNEL_CASES else case
                                  for case in sorted(SSD_KERNEL_CASES)])
def test_ssd_kernel_matches_reference_in_interpret_mode(case):
    """Through `ops` (padding masked there) with the kernels' chunks set per case; gradients are compared at
    the scale of the largest of each."""
    from pallas_kernels.ssm import ops, reference, ssd_kernel

    segments, H, P, G, N, chunk, backward_chunk, with_state = SSD_KERNEL_CASES[case]
    with_grads = _ssd_with_grads(segments, H, P, G, N, with_state)
    segments = jnp.asarray(segments, jnp.int32)
    real = (np.asarray(segments) != 0)[..., None, None]

    def kernel(*args):
        saved = ssd_kernel.CHUNK, ssd_kernel.BACKWARD_CHUNK
        ssd_kernel.CHUNK, ssd_kernel.BACKWARD_CHUNK = chunk, backward_chunk
        try:
            return ops.ssd_chunked(*args[:6], segments, 8, *args[6:], implementation="interpret")
        finally:
            ssd_kernel.CHUNK, ssd_kernel.BACKWARD_CHUNK = saved

    (got, got_final), got_grads = with_grads(kernel)
    (want, want_final), want_grads = with_grads(lambda *a: reference.ssd_chunked(*a[:6], segments, 8, *a[6:]))
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_final, want_final, rtol=1e-4, atol=1e-4)
    assert len(got_grads) == 6 + with_state
    for name, g, w in zip(SSD_GRADIENTS, got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=name)


# The SSD kernel from per-run initial states (`ssd_kernel.ssd_from_states`, the serving path) on the interpreter:
# (segment ids [B, T], runs with a state R, H, P, G, N, the kernel's chunk). "packed": the rows above with chunks of
# 4 (runs crossing chunk edges and sharing them; row 1's left padding and second state passing through, row 2's
# third run from zeros), two heads per group; "serving": a flat ragged step as `_Mixer.serve` builds it
# (single-token runs beside prefill chunks, three runs in a chunk of 8, a run ending at a chunk edge, padding at the
# end, two slots without tokens), two blocks of the head dim. Slow: "mamba2-head-serving" at Mamba-2's head (P = 64,
# N = 128) and the kernel's own chunk (32), a flat step of 100 tokens (decode tokens between prefill chunks).
SSD_STATE_CASES = {
    "packed": (SEGMENTS, R, 4, 32, 2, 16, 4),
    "serving": (SCAN_STATE_CASES["serving"][0], 8, 2, 64, 1, 16, 8),
    "mamba2-head-serving": (np.array([[1] + [2] * 40 + [3] + [4] * 30 + [5] + [6] * 20 + [0] * 7], np.int32), 8, 2,
                            64, 1, 128, 32),
}
SLOW_SSD_STATE_CASES = ("mamba2-head-serving",)


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_SSD_STATE_CASES else case
                                  for case in sorted(SSD_STATE_CASES)])
def test_ssd_kernel_from_states_matches_reference(case):
    from pallas_kernels.ssm import reference, ssd_kernel

    segments, runs, H, P, G, N, chunk = SSD_STATE_CASES[case]
    b, t = segments.shape
    x = _normal(20, (b, t, H, P))
    dt = jax.nn.softplus(_normal(21, (b, t, H)))
    A = -jnp.exp(_normal(22, (H,), 0.5))
    Bm, Cm = (_normal(key, (b, t, G, N)).astype(jnp.bfloat16) for key in (23, 24))  # as the mixer passes them
    Dv = _normal(25, (H,))
    h0 = _normal(26, (b, runs, H, P, N))
    segments = jnp.asarray(segments)
    kernel = jax.jit(functools.partial(ssm.ssd_chunked_states, implementation="interpret"), static_argnums=7)
    ssd_kernel.CHUNK, saved = chunk, ssd_kernel.CHUNK
    try:
        y, finals = kernel(x, dt, A, Bm, Cm, Dv, segments, 8, h0)
    finally:
        ssd_kernel.CHUNK = saved
    reference_states = jax.jit(reference.ssd_chunked_states, static_argnums=7)
    want_y, want_finals = reference_states(x, dt, A, Bm, Cm, Dv, segments, 8, h0)
    zero_y, zero_finals = reference_states(x, dt, A, Bm, Cm, Dv, segments, 8, jnp.zeros_like(h0))
    _assert_from_states(case, (("y", y, want_y, zero_y), ("finals", finals, want_finals, zero_finals)), segments, h0)
    with pytest.raises(ValueError, match="initial states"):
        kernel(x, dt, A, Bm, Cm, Dv, segments, 8, h0[..., :8])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_ssd_kernel_matches_reference_on_gpu():
    """Mamba-2's head shape (P = 64, N = 128), two heads per group, packed runs and padding, 300 tokens (not whole
    chunks), from random states; the kernels' tf32 matmuls against the reference at full float32 precision, y,
    the final state and every gradient."""
    from pallas_kernels.ssm import reference

    segments = np.concatenate([np.full((2, 120), 1), np.full((2, 150), 2), np.zeros((2, 30))], axis=1)
    segments[1, :7] = 0
    with_grads = _ssd_with_grads(segments, 4, 64, 2, 128, with_state=True)
    segments = jnp.asarray(segments, jnp.int32)
    got = with_grads(lambda *a: ssm.ssd_chunked(*a[:6], segments, 64, *a[6:], implementation="kernel"))
    with jax.default_matmul_precision("highest"):
        want = with_grads(lambda *a: reference.ssd_chunked(*a[:6], segments, 64, *a[6:]))
    real = (np.asarray(segments) != 0)[..., None, None]
    got, want = (jax.tree.map(np.asarray, (jnp.where(real, y, 0.0), final, *grads))
                 for (y, final), grads in (got, want))
    for name, a, b in zip(("y", "final", *SSD_GRADIENTS), got, want):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max(), name


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_ssd_kernel_from_states_matches_reference_on_gpu():
    """The serving path at Mamba-2's head shape (P = 64, N = 128, two heads per group): one flat row of 12 sequences
    (decode tokens beside prefill chunks, padding at the end) continuing from 16 slots' states; the kernel's tf32
    matmuls against the reference at full float32 precision, y and the final states."""
    from pallas_kernels.ssm import reference

    lengths = [1, 40, 1, 1, 130, 7, 1, 64, 1, 2, 17, 1]
    segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(30)])[None]
    segments = jnp.asarray(segments, jnp.int32)
    t = segments.shape[1]
    x, dt = _normal(0, (1, t, 4, 64)), jax.nn.softplus(_normal(1, (1, t, 4)))
    A, Dv = -jnp.exp(_normal(2, (4,), 0.5)), _normal(5, (4,))
    Bm, Cm = _normal(3, (1, t, 2, 128)), _normal(4, (1, t, 2, 128))
    h0 = _normal(6, (1, 16, 4, 64, 128))
    got = jax.jit(lambda *a: ssm.ssd_chunked_states(*a[:7], 64, a[7], implementation="kernel"))(x, dt, A, Bm, Cm, Dv,
                                                                                              segments, h0)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(reference.ssd_chunked_states, static_argnums=7)(x, dt, A, Bm, Cm, Dv, segments, 64, h0)
    for name, a, b in zip(("y", "finals"), got, want):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-2 * scale, name


def test_ssd_kernel_refuses_what_it_does_not_cover():
    """Head dims off the kernel's blocks, states off a power of two, chunks off a power of two and initial states of
    the wrong shape are refused with the reason; an unknown implementation likewise."""
    from pallas_kernels.ssm import ops, ssd_kernel

    def call(head_dim=32, state=16, chunk=16, initial_shape=(1, 2, 32, 16)):
        x, dt = jnp.ones((1, 8, 2, head_dim)), jnp.ones((1, 8, 2))
        bc, runs = jnp.ones((1, 8, 1, state)), jnp.zeros((1, 8), jnp.int32)
        return ssd_kernel.ssd_chunked(x, dt, -dt[0, 0], bc, bc, dt[0, 0], runs, jnp.zeros(initial_shape), chunk=chunk,
                                      interpret=True)

    with pytest.raises(ValueError, match="head dim 48"):
        call(head_dim=48, initial_shape=(1, 2, 48, 16))
    with pytest.raises(ValueError, match="state 24"):
        call(state=24, initial_shape=(1, 2, 32, 24))
    with pytest.raises(ValueError, match="chunk length 12"):
        call(chunk=12)
    with pytest.raises(ValueError, match=r"initial state of shape \(1, 2, 16, 32\)"):
        call(initial_shape=(1, 2, 16, 32))
    with pytest.raises(ValueError, match="unknown ssd_chunked implementation"):
        ops.ssd_chunked(*(jnp.ones((1, 8, 2, 32)),) * 6, jnp.ones((1, 8), jnp.int32), 8, implementation="triton")
