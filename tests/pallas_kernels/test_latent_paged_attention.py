"""Paged attention over MLA latent pages (`value_dim`: V is the first columns of K, no V pool).

The definition: latent pages read as a K pool and a V pool that holds each key's first `value_dim`
columns (zero-padded to the key width) give the same output columns. Every implementation is held
to the reference on the same pages, quantized ones included.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import ragged_paged_attention as paged_op
from pallas_kernels.paged_attention import reference, triton_kernel
from tests.pallas_kernels.test_paged_attention import MIXED, SHAPES, TILED_SHAPES, make_case, quantized_pages


@partial(jax.jit, static_argnames=("scale", "sliding_window", "softcap", "value_dim", "implementation"))
def latent_op(q, k, k_cache, meta, *, scale, value_dim, sliding_window=None, softcap=None, implementation=None):
    out, k_cache, none = paged_op(q, k, None, k_cache, None, meta, scale=scale, sliding_window=sliding_window,
                                  softcap=softcap, value_dim=value_dim, implementation=implementation)
    assert none is None  # no V pool
    return out, k_cache


def latent_case(seqs, heads, value_dim, rope_dim, *, page_size=8, seed=0):
    """A ragged batch over one latent pool `[1, P, B, value_dim + rope_dim]` (queries of `heads` heads)."""
    inputs, _ = make_case(seqs, heads, 1, seed=seed, page_size=page_size, head_dim=value_dim + rope_dim)
    return dict(q=inputs["q"], k=inputs["k"], k_cache=inputs["k_cache"], meta=inputs["meta"])


@pytest.mark.parametrize("shape,window,softcap", [("mixed", None, 2.0), ("decode", 3, None)])
def test_latent_reference_is_attention_with_v_the_key_prefix(shape, window, softcap):
    value_dim, rope_dim = 24, 8
    case = latent_case(SHAPES[shape], 6, value_dim, rope_dim, seed=3)
    options = dict(scale=0.3, sliding_window=window, softcap=softcap)
    out, cache, none = reference.ragged_paged_attention(case["q"], case["k"], None, case["k_cache"], None, case["meta"],
                                                        value_dim=value_dim, **options)
    assert none is None and out.shape == (*case["q"].shape[:2], value_dim)

    def v_prefix(x):  # a key's first value_dim columns, zero-padded to the key width
        return jnp.pad(x[..., :value_dim], [(0, 0)] * (x.ndim - 1) + [(0, rope_dim)])

    expected, k_cache, _ = reference.ragged_paged_attention(case["q"], case["k"], v_prefix(case["k"]), case["k_cache"],
                                                            v_prefix(case["k_cache"]), case["meta"], **options)
    np.testing.assert_allclose(out, expected[..., :value_dim], atol=1e-6)
    np.testing.assert_array_equal(cache, k_cache)  # the step's latents were written like keys


# name -> (seqs, heads, value_dim, rope_dim, page size, kernel settings, options): the two column parts
# unpadded (32 + 16) and padded inside the kernel (24 -> 32, 8 -> 16: masked loads); whole-page steps
# (page 8 <= block_k) and sub-page steps (page 64 > block_k 32); rows not aligned with tokens (6 heads).
LATENT_KERNEL_CASES = {
    "mixed-32+16": (MIXED, 16, 32, 16, 8, {}, {}),
    "decode-24+8-window": (SHAPES["decode"], 6, 24, 8, 8, {}, dict(sliding_window=3)),
    "prefill-32+16-subpage-softcap": (SHAPES["prefill"], 4, 32, 16, 64, {}, dict(softcap=2.0)),
    "chunks-24+8-subpage-rows16": (TILED_SHAPES["continued-chunks"], 6, 24, 8, 64, dict(rows=16, block_k=16), {}),
}


@pytest.mark.parametrize("name", sorted(LATENT_KERNEL_CASES))
def test_latent_kernel_and_tiled_match_reference(name):
    seqs, heads, value_dim, rope_dim, page_size, settings, options = LATENT_KERNEL_CASES[name]
    case = latent_case(seqs, heads, value_dim, rope_dim, page_size=page_size, seed=len(name))
    options = dict(scale=0.25, value_dim=value_dim, **options)
    expected, cache = latent_op(**case, **options, implementation="reference")
    q, meta = case["q"], case["meta"]
    got = triton_kernel.paged_attention(q, cache, None, meta, **options, **settings, interpret=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    tiled, tiled_cache = latent_op(**case, **options, implementation="tiled")
    np.testing.assert_allclose(tiled, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(tiled_cache, cache)


def test_int8_latent_pages_kernel_and_tiled_match_reference():
    """One scale per token covers its whole latent vector: K and V (its prefix) share it."""
    case = latent_case(MIXED, 8, 24, 8, seed=11)
    options = dict(scale=0.25, value_dim=24)
    float_out, _ = latent_op(**case, **options, implementation="reference")
    case["k_cache"] = quantized_pages(case["k_cache"], "int8")
    expected, cache = latent_op(**case, **options, implementation="reference")
    got = triton_kernel.paged_attention(case["q"], cache, None, case["meta"], **options, interpret=True)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    tiled, _ = latent_op(**case, **options, implementation="tiled")
    np.testing.assert_allclose(tiled, expected, atol=2e-5, rtol=1e-5)
    error = float(jnp.abs(expected - float_out).max())
    assert 0 < error < 0.03, error  # int8's bound for K/V pages (test_paged_attention.QUANT_TOLERANCE)


def test_latent_pages_refusals_are_named():
    case = latent_case(SHAPES["decode"], 4, 32, 16, seed=1)
    with pytest.raises(ValueError, match="Mosaic decode attention does not cover latent pages"):
        latent_op(**case, scale=0.1, value_dim=32, implementation="mosaic")
    with pytest.raises(ValueError, match="either a V pool or value_dim"):
        reference.paged_attention(case["q"], case["k_cache"], None, case["meta"], scale=0.1)
    with pytest.raises(ValueError, match="value_dim=64 is outside 1..48"):
        reference.paged_attention(case["q"], case["k_cache"], None, case["meta"], scale=0.1, value_dim=64)
    assert "latent pages of 1024 + 64" in triton_kernel.unsupported_reason(128, 1, 1088, 64, value_dim=1024)
    assert triton_kernel.unsupported_reason(128, 1, 576, 64, value_dim=512) is None  # DeepSeek-V3's 512 + 64


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_latent_kernel_matches_reference_on_gpu(shape):
    """DeepSeek-V3's latent pages (512 + 64, bfloat16, pages of 64) with the 16 heads of a tp-8 shard."""
    case = latent_case(SHAPES[shape], 16, 512, 64, page_size=64, seed=7)
    case = {name: value.astype(jnp.bfloat16) if name != "meta" else value for name, value in case.items()}
    options = dict(scale=576**-0.5, value_dim=512)
    expected, _ = latent_op(**case, **options, implementation="reference")
    out, _ = latent_op(**case, **options, implementation="kernel")
    got, want = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=2e-2)  # bfloat16 outputs


def test_latent_tiled_path_in_blocks_matches_reference(monkeypatch):
    """Latent pages through the tiled path's blocks (run one after another under a budget of three tiles' temporaries)."""
    from pallas_kernels.paged_attention import tiled

    value_dim, rope_dim = 24, 8
    case = latent_case(TILED_SHAPES["mixed"], 6, value_dim, rope_dim, seed=29)
    q, cache, meta = case["q"], case["k_cache"], case["meta"]
    rows = tiled.tile_size(q.shape[0], meta.kv_lens.shape[0])
    per_tile = tiled.tile_bytes(rows, q.shape[1], 1, q.shape[2], meta.page_tables.shape[1] * cache.shape[2], q.dtype)
    monkeypatch.setattr(tiled, "GATHER_BYTES", 3 * per_tile)
    options = dict(scale=0.25, value_dim=value_dim)
    expected, _ = latent_op(**case, **options, implementation="reference")
    got, _ = latent_op(**case, **options, implementation="tiled")
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
