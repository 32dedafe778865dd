"""The gated delta rule reference (`pallas_kernels/gated_delta/reference.py`): the chunked form
against its per-token step over packed and padded rows with per-run initial states (the rows of
`test_ssm.py`), and against transformers' torch implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta
from pallas_kernels.ssm import run_ids
from tests.pallas_kernels.test_ssm import SEGMENTS, R, _normal, _sequences, _start

B, T = SEGMENTS.shape
G, H, K, V = 2, 4, 8, 6  # two q/k heads, each shared by two value heads
step = jax.jit(gated_delta.gated_delta_step)
chunked = jax.jit(gated_delta.gated_delta_chunked, static_argnums=6)


def _inputs():
    q = gated_delta.l2_normalize(_normal(0, (B, T, G, K))) * K**-0.5
    k = gated_delta.l2_normalize(_normal(1, (B, T, G, K)))
    v = _normal(2, (B, T, H, V))
    g = -jax.nn.softplus(_normal(3, (B, T, H)))
    beta = jax.nn.sigmoid(_normal(4, (B, T, H)))
    return q, k, v, g, beta


# chunk 3: runs start and end inside chunks and cross chunk edges; 16: one chunk, padded.
@pytest.mark.parametrize("chunk, with_states", [(3, True), (16, False)], ids=["initial-states", "dense"])
def test_chunked_matches_steps(chunk, with_states):
    q, k, v, g, beta = _inputs()
    h0 = _normal(5, (B, R, H, K, V)) if with_states else jnp.zeros((B, R, H, K, V))
    o, finals = chunked(q, k, v, g, beta, jnp.asarray(SEGMENTS), chunk, h0 if with_states else None)
    assert (finals is None) != with_states
    for row in range(B):
        for run, (_, tokens) in enumerate(_sequences(row)):
            h = _start(h0, row, run)
            for t in tokens:
                out, h = step(q[row : row + 1, t], k[row : row + 1, t], v[row : row + 1, t], g[row : row + 1, t],
                              beta[row : row + 1, t], h)
                np.testing.assert_allclose(o[row, t], out[0], rtol=1e-4, atol=1e-5)
            if with_states and run < R:
                np.testing.assert_allclose(finals[row, run], h[0], rtol=1e-4, atol=1e-5)


def test_matches_transformers_torch_rule():
    """One unpadded row from an initial state, against `torch_chunk_gated_delta_rule` (which l2-normalises
    and scales q/k itself), final state included; and the gated norm against `Qwen3NextRMSNormGated`."""
    import torch
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    q, k = _normal(0, (1, T, G, K)), _normal(1, (1, T, G, K))
    v, g, beta = _normal(2, (1, T, H, V)), -jax.nn.softplus(_normal(3, (1, T, H))), jax.nn.sigmoid(_normal(4, (1, T, H)))
    h0 = _normal(5, (1, 1, H, K, V))
    ours, final = chunked(
        gated_delta.l2_normalize(q) * K**-0.5, gated_delta.l2_normalize(k), v, g, beta, jnp.ones((1, T), jnp.int32), 4, h0
    )
    t = [torch.from_numpy(np.array(a)) for a in (q, k, v, g, beta, h0[:, 0])]
    want, want_final = hf.torch_chunk_gated_delta_rule(*t[:5], chunk_size=4, initial_state=t[5], output_final_state=True,
                                                       use_qk_l2norm_in_kernel=True)
    np.testing.assert_allclose(ours, want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(final[:, 0], want_final.numpy(), rtol=1e-4, atol=1e-5)

    x, gate, weight = _normal(6, (3, V)), _normal(7, (3, V)), _normal(8, (V,))
    norm = hf.Qwen3NextRMSNormGated(V, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.array(weight)))
        expected = norm(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(gate))).numpy()
    np.testing.assert_allclose(gated_delta.rms_norm_gated(x, gate, weight, 1e-6), expected, rtol=1e-5, atol=1e-6)


# The kernel (`chunk_kernel.py`) in interpret mode against the reference, output and gradients, on rows from zero
# states: (segment ids [B, T], G, H, K, V, kernel chunk). "packed-gqa": test_ssm's rows (packed runs, left and
# right padding) with two value heads per q/k head, chunks of 8 (runs cross chunk edges, 13 tokens: a padded last
# chunk); "value-blocks": two blocks of the value dim (partial gradients summed), three runs, 20 tokens.
KERNEL_CASES = {
    "packed-gqa": (SEGMENTS, 2, 4, 16, 32, 8),
    "value-blocks": (np.array([[1] * 5 + [2] * 9 + [3] * 4 + [0] * 2]), 1, 2, 16, 64, 16),
}


def _with_grads(rows_tokens: tuple[int, int], groups: int, heads: int, key_dim: int, value_dim: int):
    """fn -> (fn's output, its VJP (dq, dk, dv, dg, dbeta) for a random cotangent), jitted, at random inputs."""
    b, t = rows_tokens
    q = gated_delta.l2_normalize(_normal(10, (b, t, groups, key_dim))) * key_dim**-0.5
    k = gated_delta.l2_normalize(_normal(11, (b, t, groups, key_dim)))
    v, d_o = _normal(12, (b, t, heads, value_dim)), _normal(15, (b, t, heads, value_dim))
    g = -jax.nn.softplus(_normal(13, (b, t, heads)))
    beta = jax.nn.sigmoid(_normal(14, (b, t, heads)))

    def with_grads(fn):
        @jax.jit
        def run(*inputs):
            o, vjp = jax.vjp(fn, *inputs)
            return o, vjp(d_o)
        return run(q, k, v, g, beta)

    return with_grads


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_reference_with_gradients(case):
    from pallas_kernels.gated_delta import chunk_kernel
    from pallas_kernels.gated_delta.ops import _kernel

    segments, groups, heads, key_dim, value_dim, chunk = KERNEL_CASES[case]
    segments = jnp.asarray(segments, jnp.int32)
    with_grads = _with_grads(segments.shape, groups, heads, key_dim, value_dim)

    def kernel(*a):
        chunk_kernel.CHUNK, saved = chunk, chunk_kernel.CHUNK
        try:
            return _kernel(*a, segments, interpret=True)[0]
        finally:
            chunk_kernel.CHUNK = saved

    o, grads = with_grads(kernel)
    want_o, want_grads = with_grads(lambda *a: gated_delta.gated_delta_chunked(*a, segments, 4)[0])
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta"), grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


# The forward kernel from per-run initial states (the serving path) in interpret mode against the reference, outputs
# and final states: (segment ids [B, T], runs with a state R, G, H, K, V, kernel chunk). "packed-gqa": test_ssm's
# rows (row 1 has one run: its second state passes through; row 2 three, the third from zeros), chunks of 4 (run
# ends on a chunk edge, two runs starting in one chunk); "serving": a flat ragged step as `_Mixer.serve` builds it
# (one row; single-token runs beside prefill chunks that cross chunk edges, several runs in a chunk, padding at the
# end, two slots without tokens), two value blocks.
STATE_CASES = {
    "packed-gqa": (SEGMENTS, R, 2, 4, 16, 32, 4),
    "serving": (np.array([[1] + [2] * 11 + [3] + [4] * 3 + [5] * 14 + [6] + [0] * 5]), 8, 1, 2, 16, 64, 8),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_kernel_from_states_matches_reference(case):
    from pallas_kernels.gated_delta import chunk_kernel

    segments, runs, groups, heads, key_dim, value_dim, chunk = STATE_CASES[case]
    b, t = segments.shape
    segments = jnp.asarray(segments, jnp.int32)
    q = gated_delta.l2_normalize(_normal(20, (b, t, groups, key_dim))) * key_dim**-0.5
    k = gated_delta.l2_normalize(_normal(21, (b, t, groups, key_dim)))
    v, g = _normal(22, (b, t, heads, value_dim)), -jax.nn.softplus(_normal(23, (b, t, heads)))
    beta = jax.nn.sigmoid(_normal(24, (b, t, heads)))
    h0 = _normal(25, (b, runs, heads, key_dim, value_dim))
    public = jax.jit(gated_delta.gated_delta, static_argnums=6, static_argnames="implementation")
    chunk_kernel.CHUNK, saved = chunk, chunk_kernel.CHUNK
    try:
        o, finals = public(q, k, v, g, beta, segments, 4, h0, implementation="interpret")
    finally:
        chunk_kernel.CHUNK = saved
    want_o, want_finals = chunked(q, k, v, g, beta, segments, 4, h0)
    zero_o, zero_finals = chunked(q, k, v, g, beta, segments, 4, jnp.zeros_like(h0))
    for name, got, want, zero in (("o", o, want_o, zero_o), ("finals", finals, want_finals, zero_finals)):
        error, scale = float(jnp.max(jnp.abs(got - want))), float(jnp.max(jnp.abs(want)))
        print(f"{case} {name}: max abs diff {error:.2e}, max abs value {scale:.2f}")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        # A kernel that ignored the initial states would fail the bound above by far.
        assert float(jnp.max(jnp.abs(zero - want))) > 1e3 * 1e-5, name
    absent = np.arange(runs)[None, :] > np.asarray(run_ids(segments)).max(axis=1)[:, None]  # runs without tokens
    assert absent.any()
    np.testing.assert_array_equal(np.asarray(finals)[absent], np.asarray(h0)[absent])  # their states pass through


def test_dispatch():
    """Off CUDA the default is the reference, with initial states too; initial states of the wrong shape and an
    unknown choice are refused."""
    q = gated_delta.l2_normalize(_normal(0, (B, T, G, 16)))
    k = gated_delta.l2_normalize(_normal(1, (B, T, G, 16)))
    v, g = _normal(2, (B, T, H, 32)), -jax.nn.softplus(_normal(3, (B, T, H)))
    beta = jax.nn.sigmoid(_normal(4, (B, T, H)))
    segments, h0 = jnp.asarray(SEGMENTS), _normal(5, (B, R, H, 16, 32))
    public = jax.jit(gated_delta.gated_delta, static_argnums=6, static_argnames="implementation")
    np.testing.assert_array_equal(public(q, k, v, g, beta, segments, 4)[0], chunked(q, k, v, g, beta, segments, 4)[0])
    np.testing.assert_array_equal(public(q, k, v, g, beta, segments, 4, h0)[1], chunked(q, k, v, g, beta, segments, 4,
                                                                                       h0)[1])
    with pytest.raises(ValueError, match="initial states"):
        public(q, k, v, g, beta, segments, 4, h0[..., :16], implementation="interpret")
    with pytest.raises(ValueError, match="unknown gated_delta implementation"):
        gated_delta.gated_delta(q, k, v, g, beta, segments, 4, implementation="triton")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_kernel_matches_reference_on_gpu():
    """Qwen3-Next's head shape (K = V = 128, two value heads per q/k head), packed runs and padding, 300 tokens
    (not whole chunks); the kernel's tf32 matmuls against the reference at full float32 precision."""
    segments = np.concatenate([np.full((2, 120), 1), np.full((2, 150), 2), np.zeros((2, 30))], axis=1)
    segments[1, :7] = 0
    with_grads = _with_grads(segments.shape, 2, 4, 128, 128)
    segments = jnp.asarray(segments, jnp.int32)
    got = with_grads(lambda *a: gated_delta.gated_delta(*a, segments, 64, implementation="kernel")[0])
    with jax.default_matmul_precision("highest"):
        want = with_grads(lambda *a: gated_delta.gated_delta_chunked(*a, segments, 64)[0])
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-2 * scale, name


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_kernel_from_states_matches_reference_on_gpu():
    """The serving path at Qwen3-Next's head shape: one flat row of 12 sequences (decode tokens beside prefill
    chunks, padding at the end) continuing from 16 slots' states; the kernel's tf32 matmuls against the reference
    at full float32 precision, outputs and final states."""
    lengths = [1, 40, 1, 1, 130, 7, 1, 64, 1, 2, 17, 1]
    segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(30)])[None]
    segments = jnp.asarray(segments, jnp.int32)
    t = segments.shape[1]
    q = gated_delta.l2_normalize(_normal(0, (1, t, 2, 128))) * 128**-0.5
    k = gated_delta.l2_normalize(_normal(1, (1, t, 2, 128)))
    v, g = _normal(2, (1, t, 4, 128)), -jax.nn.softplus(_normal(3, (1, t, 4)))
    beta, h0 = jax.nn.sigmoid(_normal(4, (1, t, 4))), _normal(5, (1, 16, 4, 128, 128))
    got = jax.jit(lambda *a: gated_delta.gated_delta(*a[:6], 64, a[6], implementation="kernel"))(q, k, v, g, beta,
                                                                                                 segments, h0)
    with jax.default_matmul_precision("highest"):
        want = chunked(q, k, v, g, beta, segments, 64, h0)
    for name, a, b in zip(("o", "finals"), got, want):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-2 * scale, name
