"""MLA's expanded form over latent pages (`latent_expanded.py`): the rows from `first` on equal standard
paged attention over per-head K/V pages built by up-projecting the same latents; the absorbed rows
(`absorbed_rows`) keep their outputs while every token is written."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import reference
from pallas_kernels.paged_attention.kv_quant import dequantize_pages
from pallas_kernels.paged_attention.latent_expanded import absorbed_rows, expanded_attention, expanded_crossover
from tests.pallas_kernels.test_latent_paged_attention import latent_case
from tests.pallas_kernels.test_paged_attention import MIXED, SHAPES, quantized_pages

HEADS, LATENT, ROPE, NOPE, VDIM = 4, 24, 8, 12, 10


def expanded_pages(latent_pages, w_uk, w_uv):
    """Per-head K `[H, P, B, N+R]` and V (zero-padded to the same width) from latent pages `[1, P, B, L+R]`."""
    latent, rope = latent_pages[0, ..., :LATENT], latent_pages[0, ..., LATENT:]
    k_nope = jnp.einsum("pbl,lhn->hpbn", latent, w_uk)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(rope, (HEADS, *rope.shape))], axis=-1)
    v = jnp.pad(jnp.einsum("pbl,lhv->hpbv", latent, w_uv), [(0, 0)] * 3 + [(0, NOPE + ROPE - VDIM)])
    return k, v


# (sequences, first expanded sequence, page dtype, sliding window, soft-cap, keys per block)
EXPANDED_CASES = [
    (MIXED, 3, "float32", None, None, 4),  # decode and chunk rows absorbed, a suffix expanded, many blocks
    (MIXED, 0, "float32", 5, 2.0, 16),  # every row expanded, window and soft-cap
    (SHAPES["prefill"], 2, "int8", None, None, 8),  # int8 pages: dequantized on the way up
]


@pytest.mark.parametrize("seqs,first,page_dtype,window,softcap,block", EXPANDED_CASES)
def test_expanded_rows_equal_attention_over_up_projected_pages(seqs, first, page_dtype, window, softcap, block):
    case = latent_case(seqs, HEADS, LATENT, ROPE, page_size=4, seed=first + len(seqs))
    rng = np.random.RandomState(first)
    w_uk = jnp.asarray(rng.randn(LATENT, HEADS, NOPE) * 0.3, jnp.float32)
    w_uv = jnp.asarray(rng.randn(LATENT, HEADS, VDIM) * 0.3, jnp.float32)
    q_nope = jnp.asarray(rng.randn(case["q"].shape[0], HEADS, NOPE), jnp.float32)
    q_rope = case["q"][..., LATENT:]
    meta, first = case["meta"], jnp.int32(first)
    cache = case["k_cache"] if page_dtype == "float32" else quantized_pages(case["k_cache"], page_dtype)
    options = dict(scale=0.2, sliding_window=window, softcap=softcap)
    absorbed, cache, _ = reference.ragged_paged_attention(case["q"], case["k"], None, cache, None, absorbed_rows(meta, first),
                                                          value_dim=LATENT, **options)
    got = expanded_attention(q_nope, q_rope, cache, meta, first, w_uk, w_uv, block=block, **options)

    k_pages, v_pages = expanded_pages(dequantize_pages(cache, jnp.float32), w_uk, w_uv)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    want = reference.paged_attention(q, k_pages, v_pages, meta, **options)[..., :VDIM]
    full = reference.paged_attention(case["q"], cache, None, meta, value_dim=LATENT, **options)
    seq, _, valid = reference.token_layout(meta, q.shape[0])
    rows = np.asarray(valid & (seq >= first))
    assert rows.any() and (first == 0 or (~rows & np.asarray(valid)).any())
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[~rows], 0)
    # The absorbed call attended only the earlier rows (the rest zero), as the full call does there.
    np.testing.assert_allclose(absorbed[~rows], full[~rows], atol=1e-6)
    np.testing.assert_array_equal(absorbed[rows], 0)


def test_expanded_crossover_at_deepseek_v3_shape():
    assert expanded_crossover(512, 128, 128) == 171  # L(N+V) / (2L - N - V) = 131072 / 768, rounded up
    assert expanded_crossover(16, 24, 24) == 1  # expanded is never the costlier per pair
