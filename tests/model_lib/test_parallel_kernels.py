"""Kernels under shard_map on 8 simulated devices: the Pallas kernels (interpret mode) on local shards
equal the unsharded call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_lib import parallel
from model_lib.sharding import HeadSplitError, ShardingPlan, make_mesh
from tests.pallas_kernels.test_paged_attention import make_case

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)

# (tensor size, query heads, kv heads): 28 query heads split over 2 and 4 devices with 1, 2 and 4 kv heads
# (split or replicated), and 8 devices (which 28 does not divide) with 8 query heads and 1, 2, 4, 8 kv heads.
ATTENTION_CASES = [(t, 28, kv) for t in (2, 4) for kv in (1, 2, 4)] + [(8, 8, kv) for kv in (1, 2, 4, 8)]
SEQS = [(3, 7), (1, 5), (4, 4)]  # (new tokens, kv length): a mixed prefill and decode step


def tensor_plan(size: int) -> ShardingPlan:
    return ShardingPlan(make_mesh({"tensor": size, "data": -1}))


def run_attention(q, k, v, k_cache, v_cache, meta, sinks, *, plan, implementation):
    @jax.jit
    def step(q, k, v, k_cache, v_cache, meta, sinks):
        with parallel.kernel_plan(plan):
            return parallel.paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.25, sinks=sinks,
                                            implementation=implementation)

    return step(q, k, v, k_cache, v_cache, meta, sinks)


def place(plan, inputs, sinks):
    """Inputs laid out as the sharded step holds them: caches and k/v on kv heads, q on heads."""
    axes = {"q": (None, "q_heads", None), "k": (None, "kv_heads", None), "v": (None, "kv_heads", None),
            "k_cache": ("kv_heads", None, None, None), "v_cache": ("kv_heads", None, None, None)}
    placed = {n: jax.device_put(x, plan.sharding(axes[n], x.shape)) if n in axes else x for n, x in inputs.items()}
    return placed, jax.device_put(sinks, plan.sharding(("q_heads",), sinks.shape))


@pytest.mark.parametrize("tensor, heads, kv_heads", ATTENTION_CASES, ids=lambda x: str(x))
def test_paged_attention_kernel_under_shard_map(tensor, heads, kv_heads):
    inputs, _ = make_case(SEQS, num_heads=heads, num_kv_heads=kv_heads, seed=tensor + kv_heads, num_pages=8)
    sinks = jnp.asarray(np.random.RandomState(kv_heads).randn(heads), jnp.float32)
    expected = run_attention(**inputs, sinks=sinks, plan=None, implementation="reference")
    plan = tensor_plan(tensor)
    placed, placed_sinks = place(plan, inputs, sinks)
    out, k_cache, v_cache = run_attention(**placed, sinks=placed_sinks, plan=plan, implementation="interpret")
    kv_split = kv_heads % tensor == 0
    assert (k_cache.sharding.spec != jax.sharding.PartitionSpec()) == kv_split, k_cache.sharding.spec
    np.testing.assert_allclose(out, expected[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_cache, expected[1])
    np.testing.assert_array_equal(v_cache, expected[2])


def test_paged_attention_refuses_a_split_head():
    inputs, _ = make_case(SEQS, num_heads=6, num_kv_heads=3, num_pages=8)
    plan = tensor_plan(4)
    with pytest.raises(HeadSplitError, match="valid sizes"):
        run_attention(**inputs, sinks=jnp.zeros(6), plan=plan, implementation="reference")
