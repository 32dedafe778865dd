"""Per-layer cache specs: each kind's pool shapes and bytes, and what the engine derives from them."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from model_lib import cache_spec
from model_lib.cache_spec import CrossKV, LatentKV, LayerSpecs, PagedKV, PoolSizes, RecurrentState
from pallas_kernels.paged_attention.kv_quant import QuantizedPages

SIZES = PoolSizes(num_pages=5, page_size=4, num_slots=3)


def test_paged_kv_pools_and_bytes():
    k, v = PagedKV(2, 8).allocate(SIZES, jnp.bfloat16)
    assert k.shape == v.shape == (2, 5, 4, 8) and k.dtype == jnp.bfloat16
    assert PagedKV(2, 8).allocate(SIZES, jnp.float32, repeats=3)[0].shape == (2, 3, 5, 4, 8)
    assert PagedKV(2, 8).page_bytes(4, jnp.bfloat16) == 2 * 2 * 4 * 8 * 2
    k8, _ = PagedKV(2, 8).allocate(SIZES, jnp.int8)
    assert isinstance(k8, QuantizedPages) and k8.scales.shape == (2, 5, 4)
    assert PagedKV(2, 8).page_bytes(4, jnp.int8) == 2 * 2 * 4 * (8 + 4)  # values and a float32 scale per token


def test_latent_kv_is_one_page_shared_by_every_head():
    spec = LatentKV(512 + 64)
    assert spec.allocate(SIZES, jnp.bfloat16).shape == (1, 5, 4, 576)
    assert spec.allocate(SIZES, jnp.bfloat16, repeats=2).shape == (1, 2, 5, 4, 576)
    assert spec.page_bytes(4, jnp.bfloat16) == 4 * 576 * 2  # 1,152 bytes per token and layer
    assert spec.fixed_bytes(SIZES.num_slots) == 0 and spec.prefix_cacheable


def test_recurrent_state_rows_per_slot_keep_their_own_dtype():
    spec = RecurrentState(((4, 6), (3,)))
    conv, ssm = spec.allocate(SIZES, jnp.bfloat16)
    assert conv.shape == (3, 4, 6) and ssm.shape == (3, 3) and conv.dtype == jnp.float32
    assert [a.shape for a in spec.allocate(SIZES, None, repeats=2)] == [(2, 3, 4, 6), (2, 3, 3)]
    assert spec.fixed_bytes(3) == 3 * 4 * (24 + 3) and spec.page_bytes(4, jnp.float32) == 0
    assert not spec.prefix_cacheable
    with pytest.raises(ValueError, match="do not match"):
        RecurrentState(((4, 6),), axes=((None,),))


def test_cross_kv_rows_per_slot_and_a_layer_holding_two_states():
    spec = CrossKV(2, 8, max_len=6, dtype="bfloat16")
    k, v, lengths = spec.allocate(SIZES, jnp.int8)  # the pages' (quantized) dtype does not apply
    assert k.shape == v.shape == (3, 6, 2, 8) and k.dtype == jnp.bfloat16 and lengths.shape == (3,)
    assert spec.fixed_bytes(3) == 3 * (2 * 6 * 2 * 8 * 2 + 4) and spec.page_bytes(4, jnp.float32) == 0
    assert not spec.prefix_cacheable  # decoder pages depend on the encoder input
    with pytest.raises(ValueError, match="not stacked"):
        spec.allocate(SIZES, None, repeats=2)
    both = LayerSpecs((PagedKV(2, 8), spec))
    (pages, _), (cross_k, _, _) = both.allocate(SIZES, jnp.float32)
    assert pages.shape == (2, 5, 4, 8) and cross_k.shape == (3, 6, 2, 8)
    assert both.page_bytes(4, jnp.float32) == PagedKV(2, 8).page_bytes(4, jnp.float32)
    assert both.fixed_bytes(3) == spec.fixed_bytes(3) and not both.prefix_cacheable
    # Segments (Mllama's images): equal parts of the rows, each with (start, end, real rows) per slot.
    images = CrossKV(2, 8, max_len=6, dtype="bfloat16", segments=2)
    *_, segments = images.allocate(SIZES)
    assert segments.shape == (3, 2, 3) and segments.dtype == jnp.int32
    assert images.fixed_bytes(3) == spec.fixed_bytes(3) + 3 * 2 * 3 * 4
    with pytest.raises(ValueError, match="equal segments"):
        CrossKV(2, 8, max_len=6, segments=4)


def test_totals_over_layers():
    specs = [PagedKV(2, 8), None, LatentKV(16), RecurrentState(((2,),))]
    assert cache_spec.page_bytes(specs, 4, jnp.float32) == 2 * 2 * 4 * 8 * 4 + 4 * 16 * 4
    assert cache_spec.fixed_bytes(specs, 3) == 3 * 2 * 4
    assert not cache_spec.prefix_cacheable(specs) and cache_spec.prefix_cacheable(specs[:3])


def test_engine_allocates_from_specs_and_turns_prefix_caching_off_for_recurrent_state(
    monkeypatch, caplog, tiny_checkpoint
):
    """A model one of whose layers keeps recurrent state: the runner allocates a row per slot beside the
    pages, and the engine serves it without prefix caching (its pages cannot restore the state)."""
    from model_lib import from_pretrained
    from model_lib.config import ModelConfig
    from serving.engine.engine import EngineConfig, LLMEngine

    model = from_pretrained(tiny_checkpoint("llama-gqa")[0])
    state = RecurrentState(((7,),))
    original = ModelConfig.layer_cache_spec
    monkeypatch.setattr(ModelConfig, "layer_cache_spec",
                        lambda self, layer: state if layer == 0 else original(self, layer))
    with caplog.at_level(logging.INFO):
        engine = LLMEngine(model, config=EngineConfig(max_num_seqs=2, max_model_len=32, num_pages=16,
                                                      enforce_eager=True))
    assert not engine.pool.enable_prefix_caching and "prefix caching is off" in caplog.text
    (rows,), pages = engine.runner.kv_caches[0], engine.runner.kv_caches[1]
    assert rows.shape == (3, 7) and pages[0].shape[1:3] == (16, EngineConfig().page_size)
    np.testing.assert_array_equal(np.asarray(rows), 0)
