"""Kernels under shard_map on 8 simulated devices: the Pallas kernels (interpret mode) on local shards
equal the unsharded call."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_lib import parallel
from model_lib.sharding import EXPERT_PARALLEL, HeadSplitError, ShardingPlan, make_mesh
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
    def put(name, x):  # quantized caches: scales [K, P, B] placed like their values
        return jax.tree.map(lambda a: jax.device_put(a, plan.sharding(axes[name][: a.ndim], a.shape)), x)

    placed = {n: put(n, x) if n in axes else x for n, x in inputs.items()}
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


@pytest.mark.parametrize("kv_heads", [1], ids=["kv-replicated"])  # 4 (kv-split) passes too; left out for CI time
def test_quantized_pages_under_shard_map(kv_heads):
    """int8 pages with their scales: split on kv heads like the values (or replicated), same as unsharded."""
    from tests.pallas_kernels.test_paged_attention import quantized_pages

    inputs, _ = make_case(SEQS, num_heads=28, num_kv_heads=kv_heads, seed=kv_heads, num_pages=8)
    inputs.update(k_cache=quantized_pages(inputs["k_cache"], "int8"), v_cache=quantized_pages(inputs["v_cache"], "int8"))
    sinks = jnp.asarray(np.random.RandomState(kv_heads).randn(28), jnp.float32)
    expected = run_attention(**inputs, sinks=sinks, plan=None, implementation="reference")
    plan = tensor_plan(4)
    placed, placed_sinks = place(plan, inputs, sinks)
    out, k_cache, v_cache = run_attention(**placed, sinks=placed_sinks, plan=plan, implementation="interpret")
    assert (k_cache.scales.sharding.spec != jax.sharding.PartitionSpec()) == (kv_heads == 4)
    np.testing.assert_allclose(out, expected[0], atol=2e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves((k_cache, v_cache)), jax.tree.leaves(expected[1:])):
        np.testing.assert_array_equal(got, want)


def test_paged_attention_refuses_a_split_head():
    inputs, _ = make_case(SEQS, num_heads=6, num_kv_heads=3, num_pages=8)
    plan = tensor_plan(4)
    with pytest.raises(HeadSplitError, match="valid sizes"):
        run_attention(**inputs, sinks=jnp.zeros(6), plan=plan, implementation="reference")


def moe_config(**changes):
    from model_lib.config import ModelConfig

    base = dict(architecture="GptOssForCausalLM", family="gpt_oss", vocab_size=64, hidden_size=16,
                intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                max_position_embeddings=64, layer_types=("full_attention",), num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, moe_layers=(True,), expert_bias=True, router_bias=True,
                expert_swiglu_limit=7.0, initializer_range=0.5)
    return ModelConfig(**{**base, **changes})


def run_moe(moe, x, plan):
    from flax import nnx

    @nnx.jit
    def step(moe, x):
        with parallel.kernel_plan(plan):
            return moe(x)

    return step(moe, x)


@pytest.mark.parametrize("strategy", EXPERT_PARALLEL)
def test_moe_kernel_under_shard_map_expert4_tensor2(strategy, monkeypatch):
    """Experts split 4 ways, their width 2 ways (with output biases that one width shard adds)."""
    from flax import nnx

    from model_lib.layers import moe as moe_layer
    from model_lib.sharding import load_mesh_preset, shard_model
    from pallas_kernels.moe import grouped_matmul

    monkeypatch.setattr(moe_layer, "grouped_matmul", partial(grouped_matmul, implementation="interpret"))
    moe = moe_layer.MoE(moe_config(), rngs=nnx.Rngs(0))
    for i, projection in enumerate((moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj)):
        bias = projection.bias[...]
        projection.bias[...] = jnp.asarray(np.random.RandomState(i).randn(*bias.shape), bias.dtype)
    x = jnp.asarray(np.random.RandomState(0).randn(13, 16), jnp.float32)  # 13 tokens: a2a pads to 16
    expected = run_moe(moe, x, None)
    plan = dataclasses.replace(load_mesh_preset("ep"), expert_parallel=strategy)
    assert dict(plan.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 4}
    shard_model(moe, plan)
    assert moe.experts.down_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(("expert",), ("tensor",), None)
    got = run_moe(moe, x, plan)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_expert_parallel_is_a_plan_setting():
    from model_lib.sharding import load_mesh_preset

    assert load_mesh_preset("ep").expert_parallel == "psum"  # configs/mesh/ep.yaml
    with pytest.raises(ValueError, match="unknown expert_parallel 'ring'"):
        dataclasses.replace(load_mesh_preset("ep"), expert_parallel="ring")


@pytest.mark.parametrize("strategy", EXPERT_PARALLEL)
def test_moe_gradients_under_shard_map_equal_unsharded(strategy):
    """What the trainer differentiates: the experts' shard_map (jnp reference inside) transposes exactly."""
    from flax import nnx

    from model_lib.layers.moe import MoE
    from model_lib.sharding import load_mesh_preset, shard_model

    def grads(moe, x, plan):
        @nnx.jit
        def step(moe, x):
            def loss(moe):
                with parallel.kernel_plan(plan):
                    return jnp.sum(moe(x) ** 2)

            return nnx.grad(loss)(moe)

        return nnx.to_flat_state(step(moe, x))

    def block():
        moe = MoE(moe_config(), rngs=nnx.Rngs(0))
        for i, projection in enumerate((moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj)):
            bias = projection.bias[...]
            projection.bias[...] = jnp.asarray(np.random.RandomState(i).randn(*bias.shape), bias.dtype)
        return moe

    x = jnp.asarray(np.random.RandomState(0).randn(16, 16), jnp.float32)
    expected = grads(block(), x, None)
    plan = dataclasses.replace(load_mesh_preset("ep"), expert_parallel=strategy)
    got = grads(shard_model(block(), plan), x, plan)
    assert [path for path, _ in got] == [path for path, _ in expected]
    for (path, a), (_, b) in zip(expected, got):
        np.testing.assert_allclose(b.get_value(), a.get_value(), rtol=1e-4, atol=1e-4, err_msg=str(path))
