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
from pallas_kernels.paged_attention.kv_quant import page_values
from tests.hlo_checks import all_gathered_shapes
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


def run_attention(q, k, v, k_cache, v_cache, meta, sinks, *, plan, implementation, layer=None):
    @jax.jit
    def step(q, k, v, k_cache, v_cache, meta, sinks, layer):
        with parallel.kernel_plan(plan):
            return parallel.paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.25, sinks=sinks, layer=layer,
                                            implementation=implementation)

    return step(q, k, v, k_cache, v_cache, meta, sinks, layer)


def place(plan, inputs, sinks):
    """Inputs laid out as the sharded step holds them: caches and k/v on kv heads, q on heads."""
    cache_axes = ("kv_heads",) + (None,) * (page_values(inputs["k_cache"]).ndim - 1)  # one layer's pool or a stacked one
    axes = {"q": (None, "q_heads", None), "k": (None, "kv_heads", None), "v": (None, "kv_heads", None),
            "k_cache": cache_axes, "v_cache": cache_axes}
    def put(name, x):  # quantized caches: scales placed like their values, less the last axis
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


@pytest.mark.parametrize("kv_heads", [1, 4])  # replicated on 4 devices, and split
def test_stacked_pool_layer_under_shard_map(kv_heads):
    """A layer of a stacked pool `[K, L, P, B, D]` (kv heads split or replicated) equals the one-layer call;
    with bidirectional spans (the replicated metadata carries `visible_until`)."""
    inputs, _ = make_case(SEQS, num_heads=28, num_kv_heads=kv_heads, seed=kv_heads, num_pages=8)
    spans = jnp.asarray([6, 6, 6, 4, 1, 1, 2, 3, 0, 0, 0], jnp.int32)  # (4, 7) of SEQS[0], (0, 2) of SEQS[2]
    inputs["meta"] = inputs["meta"].replace(visible_until=spans)
    sinks = jnp.asarray(np.random.RandomState(kv_heads).randn(28), jnp.float32)
    expected = run_attention(**inputs, sinks=sinks, plan=None, implementation="reference")
    other = jnp.asarray(np.random.RandomState(3).randn(*inputs["k_cache"].shape).astype(np.float32))
    stacked = {**inputs, "k_cache": jnp.stack([other, inputs["k_cache"]], 1),
               "v_cache": jnp.stack([other, inputs["v_cache"]], 1)}
    plan = tensor_plan(4)
    placed, placed_sinks = place(plan, stacked, sinks)
    out, k_cache, v_cache = run_attention(**placed, sinks=placed_sinks, plan=plan, implementation="interpret",
                                          layer=jnp.int32(1))
    np.testing.assert_allclose(out, expected[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(k_cache[:, 1], expected[1])
    np.testing.assert_array_equal(v_cache[:, 0], other)


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


# (mesh, query heads, kv heads): dense (training) attention split over batch rows and heads; kv heads
# split with the query heads, replicated (fewer than the tensor size), and one (MQA).
DENSE_CASES = [({"fsdp": 4, "tensor": 2}, 4, 2), ({"data": 2, "tensor": 4}, 8, 2), ({"tensor": 8}, 8, 1)]


# Logical axes of `dense_inputs`: laid out as a sharded training step holds them.
DENSE_AXES = {"q": ("batch", None, "q_heads", None), "k": ("batch", None, "kv_heads", None),
              "v": ("batch", None, "kv_heads", None), "weights": ("batch", None, "q_heads", None),
              "sinks": ("q_heads",), "segments": ("batch", None), "positions": ("batch", None),
              "visible_until": ("batch", None)}


def dense_inputs(heads: int, kv_heads: int, batch: int = 4, length: int = 8, head_dim: int = 16) -> dict:
    """Random q/k/v, packed rows (two segments and padding) with a bidirectional span in each segment, sinks,
    and a cotangent to weigh the output."""
    rng = np.random.RandomState(heads + kv_heads)
    arrays = dict(q=(batch, length, heads, head_dim), k=(batch, length, kv_heads, head_dim),
                  v=(batch, length, kv_heads, head_dim), sinks=(heads,), weights=(batch, length, heads, head_dim))
    inputs = {name: jnp.asarray(rng.randn(*shape), jnp.float32) for name, shape in arrays.items()}  # `loss` order
    segments = np.array([[1] * 3 + [2] * 4 + [0]] * batch, np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0]] * batch, np.int32)
    visible_until = np.array([[0, 2, 2, 1, 1, 2, 3, 0]] * batch, np.int32)  # spans (1, 3) and (0, 2)
    return dict(inputs, segments=jnp.asarray(segments), positions=jnp.asarray(positions),
                visible_until=jnp.asarray(visible_until))


def dense_step(plan):
    """Forward and gradients (q, k, v, sinks) of a weighted sum of dense attention, jitted."""

    def loss(q, k, v, sinks, weights, segments, positions, visible_until):
        with parallel.kernel_plan(plan):
            out = parallel.dense_attention(q, k, v, q_positions=positions, kv_positions=positions,
                                           q_segment_ids=segments, kv_segment_ids=segments, scale=0.25,
                                           sliding_window=3, softcap=20.0, sinks=sinks, visible_until=visible_until)
        return jnp.sum(out * weights), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("mesh, heads, kv_heads", DENSE_CASES,
                         ids=lambda x: "x".join(f"{a}{n}" for a, n in x.items()) if isinstance(x, dict) else str(x))
def test_dense_attention_under_shard_map_equals_unsharded(mesh, heads, kv_heads):
    """Forward and gradients equal the unsharded op; the compiled step gathers no q/k/v (or output)."""
    inputs = dense_inputs(heads, kv_heads)
    (_, expected), expected_grads = dense_step(None)(*inputs.values())
    plan = ShardingPlan(make_mesh(mesh))
    placed = {name: jax.device_put(x, plan.sharding(DENSE_AXES[name], x.shape)) for name, x in inputs.items()}
    step = dense_step(plan)
    compiled = step.lower(*placed.values()).compile()
    assert not [s for s in all_gathered_shapes(compiled.as_text()) if len(s) == 4]
    (_, out), grads = compiled(*placed.values())
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    for name, got, want in zip("q k v sinks".split(), grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=name)


def test_the_gather_check_sees_q_k_v_gathered_outside_shard_map():
    """The control: the same step with the op outside shard_map lets XLA gather k/v (replicated kv heads)."""
    mesh, heads, kv_heads = DENSE_CASES[1]
    inputs = dense_inputs(heads, kv_heads)
    plan = ShardingPlan(make_mesh(mesh))
    placed = {name: jax.device_put(x, plan.sharding(DENSE_AXES[name], x.shape)) for name, x in inputs.items()}
    hlo = dense_step(None).lower(*placed.values()).compile().as_text()
    assert (2, 8, kv_heads, 16) in all_gathered_shapes(hlo)


@pytest.mark.parametrize("strategy", EXPERT_PARALLEL)
def test_expert_lora_under_shard_map_expert4_tensor2(strategy):
    """Expert adapters split with their experts: A and B over `expert`, gate/up B and down A over the width."""
    from flax import nnx

    from model_lib import expert_lora
    from model_lib.layers import moe as moe_layer
    from model_lib.sharding import load_mesh_preset, shard_model

    moe = moe_layer.MoE(moe_config(expert_bias=False, expert_swiglu_limit=None), rngs=nnx.Rngs(0))
    e = moe.experts
    groups = {"gate_up_proj": [("gate_proj", e.gate_proj), ("up_proj", e.up_proj)], "down_proj": [("down_proj", e.down_proj)]}
    expert_lora.attach(groups, r=4, scale=2.0, rngs=nnx.Rngs(1))
    for i, projection in enumerate((e.gate_proj, e.up_proj, e.down_proj)):
        projection.lora_b[...] = jnp.asarray(np.random.RandomState(i).randn(*projection.lora_b.shape), jnp.float32)
    x = jnp.asarray(np.random.RandomState(0).randn(13, 16), jnp.float32)
    expected = run_moe(moe, x, None)
    plan = dataclasses.replace(load_mesh_preset("ep"), expert_parallel=strategy)
    shard_model(moe, plan)
    assert e.down_proj.lora_a[...].sharding.spec == jax.sharding.PartitionSpec(("expert",), ("tensor",), None)
    np.testing.assert_allclose(run_moe(moe, x, plan), expected, atol=2e-5, rtol=1e-5)
