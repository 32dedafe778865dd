"""Sharded loading on 8 simulated CPU devices gives the unsharded logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model_lib
from model_lib.sharding import ShardingPlan, load_mesh_preset, make_mesh
from tests.tiny_models import MOE_CASES, ONE_PER_ARCHITECTURE, SEQ_LEN, assert_logits_close, padded_batch

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)


@pytest.mark.parametrize("preset", ["tp", "fsdp_tp"])
@pytest.mark.parametrize("case", ONE_PER_ARCHITECTURE)
def test_sharded_logits_equal_unsharded(case, preset, tiny_checkpoint, forward):
    folder, _ = tiny_checkpoint(case)
    ids, mask, _ = padded_batch(seed=6)
    reference = np.asarray(forward(model_lib.from_pretrained(folder), ids, mask))

    plan = load_mesh_preset(preset)
    model = model_lib.from_pretrained(folder, mesh=plan)
    attn = model.model.layers[0].self_attn
    q_kernel = (attn.q_proj if attn.q_proj is not None else attn.q_b_proj).kernel[...]  # MLA: q_a_proj -> q_b_proj
    assert q_kernel.sharding.mesh.shape == plan.mesh.shape
    assert len(q_kernel.sharding.device_set) == 8
    assert q_kernel.sharding.spec != P(None, None), "the query projection should be split"
    assert_logits_close(forward(model, ids, mask), reference, rel=1e-5)


@pytest.mark.parametrize("case", MOE_CASES)
def test_expert_parallel_logits_equal_unsharded(case, tiny_checkpoint, forward):
    """The `ep` preset splits the stacked expert weights over the `expert` axis."""
    folder, _ = tiny_checkpoint(case)
    ids, mask, _ = padded_batch(seed=6)
    reference = np.asarray(forward(model_lib.from_pretrained(folder), ids, mask))

    model = model_lib.from_pretrained(folder, mesh="ep")
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    kernel = moe.experts.gate_proj.kernel[...]
    assert kernel.sharding.spec[0] in ("expert", ("expert",)), kernel.sharding.spec
    assert len(kernel.sharding.device_set) == 8
    assert_logits_close(forward(model, ids, mask), reference, rel=1e-5)


def test_presets_shape_the_mesh():
    tp = load_mesh_preset("tp")
    assert dict(tp.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 8, "expert": 1}
    fsdp_tp = load_mesh_preset("fsdp_tp")
    assert dict(fsdp_tp.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert dict(load_mesh_preset("fsdp_tp", tensor=4).mesh.shape)["fsdp"] == 2
    assert dict(load_mesh_preset("ep").mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 4}


def test_partition_spec_rules():
    plan = ShardingPlan(make_mesh({"fsdp": 2, "tensor": 4}))
    assert plan.partition_spec(("embed", "q_heads"), (64, 64)) == P(("fsdp",), ("tensor",))
    assert plan.partition_spec(("vocab", "embed"), (128, 64)) == P(("tensor",), ("fsdp",))
    # A dimension the axes do not divide stays whole (MQA's single kv head under TP=4 with head_dim 6).
    assert plan.partition_spec(("embed", "kv_heads"), (64, 6)) == P(("fsdp",), None)
    assert plan.partition_spec(("norm",), (64,)) == P(None)


def test_bad_mesh_requests_are_named():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"tensor": 6})
    with pytest.raises(FileNotFoundError, match="presets: .*tp"):
        load_mesh_preset("no_such_preset")


def test_random_init_model_can_be_sharded():
    from model_lib.families.llama import llama_config
    from tests.tiny_models import CASES_BY_NAME

    config = llama_config(CASES_BY_NAME["llama-gqa"].hf_config(), "LlamaForCausalLM")
    ids = np.arange(2 * SEQ_LEN, dtype=np.int32).reshape(2, SEQ_LEN) % config.vocab_size
    unsharded = np.asarray(model_lib.from_config(config, seed=3)(ids))
    sharded = model_lib.from_config(config, seed=3, mesh="fsdp_tp")
    assert len(sharded.model.embed_tokens.weight[...].sharding.device_set) == 8
    assert_logits_close(sharded(ids), unsharded, rel=1e-5)
