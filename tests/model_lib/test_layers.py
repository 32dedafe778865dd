"""Shared building blocks on hand-checked cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model_lib.config import RopeConfig
from model_lib.decoder import positions_from_segments
from model_lib.layers.rotary import apply_rotary, rotary_cos_sin
from pallas_kernels.flash_attention.reference import attention, attention_mask


def test_positions_restart_per_segment_and_zero_on_padding():
    segments = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0], [3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(
        positions_from_segments(segments), [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]]
    )


def test_sliding_window_mask_counts_the_query_itself():
    positions = jnp.arange(6)[None]
    ones = jnp.ones((1, 6), jnp.int32)
    mask = np.asarray(attention_mask(positions, positions, ones, ones, sliding_window=3))[0]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]


def test_padding_queries_stay_finite():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(1, 4, 2, 8), jnp.float32) for _ in range(3))
    segments = jnp.array([[0, 0, 1, 1]])
    out = attention(q, k, v, q_positions=positions_from_segments(segments), kv_positions=positions_from_segments(segments),
                    q_segment_ids=segments, kv_segment_ids=segments, scale=0.5)
    assert np.isfinite(np.asarray(out)).all()
    # The first real token sees only itself: its output is its own value.
    np.testing.assert_allclose(out[0, 2], v[0, 2], rtol=1e-6)


def test_rotary_preserves_norm_and_relative_angle():
    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=8)
    x = jnp.asarray(np.random.RandomState(1).randn(1, 6, 1, 8), jnp.float32)
    cos, sin = rotary_cos_sin(rope, jnp.arange(6)[None], jnp.full((1, 6), 6), jnp.float32)
    for interleaved in (False, True):
        y = apply_rotary(x, cos, sin, interleaved)
        np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Same vector at positions p and p+d: the dot product depends only on d.
    same = jnp.broadcast_to(x[:, :1], x.shape)
    y = apply_rotary(same, cos, sin, False)[0, :, 0]
    np.testing.assert_allclose(y[0] @ y[2], y[3] @ y[5], rtol=1e-5)


def test_partial_rotary_passes_the_tail_through():
    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=4)
    x = jnp.asarray(np.random.RandomState(2).randn(1, 3, 2, 8), jnp.float32)
    cos, sin = rotary_cos_sin(rope, jnp.arange(3)[None], jnp.full((1, 3), 3), jnp.float32)
    np.testing.assert_array_equal(apply_rotary(x, cos, sin, False)[..., 4:], x[..., 4:])


def test_cpu_computes_rotary_cos_sin_once_per_step():
    """Three layers (a projection between them, as in a model) rotate q and k: on XLA:CPU cos is computed once
    (plus the conditional's spare branch), not fused into every rotation, and the rotations match the formula."""
    import jax

    rope = RopeConfig(kind="default", theta=10000.0, rotary_dim=8)
    rng = np.random.RandomState(3)
    q, k = (jnp.asarray(rng.randn(1, 16, n, 8), jnp.float32) for n in (4, 2))
    w = jnp.asarray(np.linalg.qr(rng.randn(8, 8))[0], jnp.float32)
    positions, lens = jnp.arange(16)[None], jnp.full((1, 16), 16)

    def layers(q, k, positions, lens):
        for _ in range(3):
            cos, sin = rotary_cos_sin(rope, positions, lens, jnp.float32)
            q, k = apply_rotary(q @ w, cos, sin, False), apply_rotary(k @ w, cos, sin, False)
        return q, k

    hlo = jax.jit(layers).lower(q, k, positions, lens).compile().as_text()
    assert hlo.count(" cosine(") == 2, hlo.count(" cosine(")
    angles = np.arange(16)[:, None] / 10000.0 ** (np.arange(0, 8, 2) / 8)
    cos, sin = jnp.asarray(np.cos(angles)[None], jnp.float32), jnp.asarray(np.sin(angles)[None], jnp.float32)
    want = q
    for _ in range(3):
        want = apply_rotary(want @ w, cos, sin, False)
    np.testing.assert_allclose(jax.jit(layers)(q, k, positions, lens)[0], want, rtol=1e-5, atol=1e-5)
