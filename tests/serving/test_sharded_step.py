"""The sharded serving step, compiled on 8 simulated devices with the GPU's kernel choice (the Pallas
kernels, here on the interpreter): XLA never all-gathers a KV cache or an expert stack around them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from tests.hlo_checks import all_gathered_shapes

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)

NUM_PAGES, PAGE_SIZE, HEAD_DIM, EXPERTS = 16, 4, 16, 8


def is_cache_or_experts(shape: tuple[int, ...]) -> bool:
    """A KV cache `[K, pages, page_size, D]` (any K) or a stack holding every expert `[X, ...]`."""
    return shape[1:] == (NUM_PAGES, PAGE_SIZE, HEAD_DIM) or (len(shape) == 3 and shape[0] == EXPERTS)


def step_inputs():
    """A prefill step of two sequences (3 and 5 tokens) in a step padded to 8 tokens and 4 sequences."""
    from model_lib.layers import PagedBatch
    from pallas_kernels.paged_attention import PagedMetadata
    from serving.engine.runner import StepInputs

    meta = PagedMetadata(np.array([0, 3, 8, 8, 8], np.int32), np.array([3, 5, 0, 0], np.int32),
                         np.array([[0, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32), np.int32(2))
    positions = np.array([0, 1, 2, 0, 1, 2, 3, 4], np.int32)
    seq_lens = np.array([3, 3, 3, 5, 5, 5, 5, 5], np.int32)
    ids = np.random.RandomState(0).randint(0, 64, 8).astype(np.int32)
    return StepInputs(ids, np.full(8, -1, np.int32), PagedBatch(positions, seq_lens, meta), np.array([2, 7, 0, 0], np.int32))


@pytest.mark.parametrize("shard_kernels", [True, False], ids=["shard_map", "control"])
def test_sharded_step_gathers_no_cache_or_expert_stack(shard_kernels, monkeypatch):
    from model_lib import CausalLM
    from model_lib.config import ModelConfig
    from model_lib.parallel import kernel_plan
    from model_lib.sharding import load_mesh_preset, shard_model
    from pallas_kernels.moe import ops as moe_ops
    from pallas_kernels.paged_attention import ops as attention_ops
    from serving.engine import runner as runner_module

    config = ModelConfig(
        architecture="MixtralForCausalLM", family="mixtral", vocab_size=64, hidden_size=32, intermediate_size=32,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, max_position_embeddings=64,
        layer_types=("full_attention",), num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_layers=(True,), initializer_range=0.2,
    )
    sizes = dict(num_pages=NUM_PAGES, page_size=PAGE_SIZE, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=16)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    if shard_kernels:  # the unsharded step's logits (jnp references), to compare with
        single = runner_module.ModelRunner(model, **sizes)
        expected = single._step(*single.step_args(step_inputs()))[0]

    # What a CUDA lowering picks (the Pallas kernels), run on the interpreter.
    kernels = lambda kernel, reference, *args: kernel(*args, interpret=True)  # noqa: E731
    monkeypatch.setattr(attention_ops, "on_cuda", kernels)
    monkeypatch.setattr(moe_ops, "on_cuda", kernels)
    if not shard_kernels:  # the control: the same step with the kernels outside shard_map
        monkeypatch.setattr(runner_module, "kernel_plan", lambda plan: kernel_plan(None))
    plan = load_mesh_preset("ep")  # expert 4 x tensor 2
    runner = runner_module.ModelRunner(shard_model(model, plan), **sizes, plan=plan)
    assert runner.kv_caches[0][0].sharding.spec[0] == "tensor"
    args = runner.step_args(step_inputs())
    compiled = runner._step.lower(*args).compile()
    gathered = {s for s in all_gathered_shapes(compiled.as_text()) if is_cache_or_experts(s)}
    if shard_kernels:
        assert not gathered, gathered
        np.testing.assert_allclose(compiled(*args)[0][:2], expected[:2], rtol=1e-5, atol=1e-5)
    else:  # kernels outside shard_map: XLA gathers both around the calls, and the check sees it
        assert any(len(s) == 4 for s in gathered) and any(len(s) == 3 for s in gathered), gathered
