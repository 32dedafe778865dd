"""Quantized weights (int8, int4, FP8) shard with their kernels on 8 simulated CPU devices.

Their storage carries the kernel's logical axes: values split like the kernel, scales and zero
points with their output channels and input groups. Sharded logits equal the unsharded quantized
model's; a mesh that would cut an input group from its scales is refused, naming the valid sizes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import model_lib
from model_lib.lora import linear_layers
from model_lib.sharding import GroupSplitError, load_mesh_preset
from tests.tiny_models import DIMS, TinyCase, assert_logits_close, build_checkpoint, padded_batch

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
)

# 4 heads of 64, hidden 256, intermediate 512: int4 groups of 128 give every q/k/v/o/gate/up input 2
# groups and down_proj's 4, so a split of the inputs over 2 devices keeps whole groups.
GROUPED = TinyCase("llama-grouped", "LlamaConfig", dict(num_key_value_heads=2),
                   dims=dict(DIMS, hidden_size=256, intermediate_size=512))
# quantization -> (mesh preset, sizes): int8 under fsdp 4 x tensor 2; int4 under data 2 x fsdp 2 x tensor 2
# (inputs split over fsdp in q/k/v/gate/up, over tensor in o/down); FP8 (one group) under tensor 4.
MESHES = {"int8": ("fsdp_tp", {}), "int4": ("fsdp_tp", dict(data=2, tensor=2)), "fp8": ("tp", dict(tensor=4, data=2))}


@pytest.fixture(scope="module")
def grouped_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp(GROUPED.name)
    build_checkpoint(GROUPED, folder)
    return folder


def split_dims(array) -> tuple[int, ...]:
    """The dimensions of a placed array that its sharding splits."""
    shard = array.sharding.shard_shape(array.shape)
    return tuple(i for i, (whole, part) in enumerate(zip(array.shape, shard)) if part < whole)


@pytest.mark.parametrize("quantization", sorted(MESHES))
def test_sharded_quantized_logits_equal_unsharded(quantization, grouped_checkpoint, forward):
    ids, mask, _ = padded_batch(seed=6)
    reference = np.asarray(forward(model_lib.from_pretrained(grouped_checkpoint, quantization=quantization), ids, mask))
    preset, sizes = MESHES[quantization]
    model = model_lib.from_pretrained(grouped_checkpoint, quantization=quantization, mesh=load_mesh_preset(preset, **sizes))
    layers = linear_layers(model)
    q_proj, down = layers["model.layers.0.self_attn.q_proj"].quantized, layers["model.layers.0.mlp.down_proj"].quantized
    for weight in (q_proj, down):
        assert all(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(weight))
    if quantization == "int8":  # values [in, out], scale [out]: both split along the output channels
        assert split_dims(q_proj.values[...]) == (0, 1) and split_dims(q_proj.scale[...]) == (0,)
    elif quantization == "int4":  # packed [in / 2, out], scales / zeros [in / G, out]: groups split with their rows
        assert split_dims(q_proj.packed[...]) == (0, 1) and split_dims(q_proj.scales[...]) == (0, 1)
        assert split_dims(down.packed[...]) == (0, 1) and split_dims(down.zeros[...]) == (0, 1)
    else:  # values [out, in], scales [1, out]
        assert split_dims(q_proj.values[...]) == (0,) and split_dims(q_proj.scales[...]) == (1,)
        assert split_dims(down.values[...]) == (1,)
    assert_logits_close(forward(model, ids, mask), reference, rel=1e-5)


def test_a_split_that_cuts_a_group_is_refused(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama-gqa")  # int4 down_proj: 96 inputs in 3 groups of 32
    with pytest.raises(GroupSplitError, match=r"mlp\.down_proj\.kernel: .* cuts its 3 groups of 32 inputs .*"
                                              r"valid sizes: 1, 3$"):
        model_lib.from_pretrained(folder, quantization="int4", mesh=load_mesh_preset("tp", tensor=4, data=2))


def test_sharded_fp8_serving_generates_as_unsharded(tiny_checkpoint):
    """The engine on a mesh (tensor 2 x data 4) with W8A8 FP8 layers: greedy tokens equal the unsharded engine's."""
    from serving import LLM, SamplingParams

    folder, _ = tiny_checkpoint("llama-gqa")
    prompts = [{"prompt_token_ids": [3, 5, 7, 9]}, {"prompt_token_ids": [11, 4]}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = [LLM(folder, dtype="float32", quantization="fp8", max_model_len=64, page_size=8, mesh=mesh).generate(
        prompts, params) for mesh in (None, load_mesh_preset("tp", tensor=2, data=4))]
    unsharded, sharded = ([o.outputs[0].token_ids for o in run] for run in runs)
    assert sharded == unsharded
