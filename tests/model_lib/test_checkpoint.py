"""Checkpoint I/O: sharded files, save/reload round trip, and errors that name the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model_lib
from model_lib import CheckpointError, UnknownArchitectureError
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    folder, hf_model = tiny_checkpoint("llama-gqa")
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    return copy, hf_model


def _rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case",
    [
        "phi3-longrope-partial",
        "gpt_bigcode-mha-untied",
        "qwen3-qknorm",
        "gpt2-conv1d",
        "gpt_neox-sequential",
        "opt-post-ln-projected",
        "falcon-new-arch-gqa",
        "bloom-alibi",
        "mpt-clip-qkv",
        "mixtral-moe",
        "qwen2_moe-shared",
        "granitemoeshared-shared",
        "dbrx-clip-moe",
        "gpt_oss-sinks-sliding",
        "glm4_moe-grouped-sigmoid",
    ],
)
def test_save_reload_round_trip(case, tiny_checkpoint, tmp_path, forward):
    """Saving gives back HF's own tensors (fused ones re-joined), and transformers loads it."""
    import transformers

    folder, hf_model = tiny_checkpoint(case)
    model = model_lib.from_pretrained(folder)
    model_lib.save_pretrained(model, tmp_path / "saved")

    original = load_file(folder / "model.safetensors")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)

    ids = random_ids(2, SEQ_LEN, seed=7)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert_logits_close(hf_logits(reloaded, ids), hf_logits(hf_model, ids), rel=1e-6)


def test_sharded_checkpoint_loads_and_saves(tiny_checkpoint, tmp_path, forward):
    folder, hf_model = tiny_checkpoint("llama-gqa")
    model = model_lib.from_pretrained(folder)
    model_lib.save_pretrained(model, tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert not list((tmp_path / "sharded").glob("*.tmp"))

    ids = random_ids(2, SEQ_LEN, seed=8)
    reloaded = model_lib.from_pretrained(tmp_path / "sharded")
    assert_logits_close(forward(reloaded, ids, np.ones_like(ids)), hf_logits(hf_model, ids))


def test_dtype_default_follows_the_checkpoint(llama_copy):
    folder, _ = llama_copy
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert model_lib.load_config(folder)[0].dtype == "bfloat16"
    assert model_lib.load_config(folder, dtype="float16")[0].dtype == "float16"
    with pytest.raises(ValueError, match="int8"):
        model_lib.load_config(folder, dtype="int8")


def test_missing_tensor_is_named(llama_copy):
    folder, _ = llama_copy
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        model_lib.from_pretrained(folder)


def test_unexpected_tensor_is_named(llama_copy):
    folder, _ = llama_copy
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight' in .*model\.safetensors"):
        model_lib.from_pretrained(folder)


def test_wrong_shape_is_named(llama_copy):
    folder, _ = llama_copy

    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]

    _rewrite_weights(folder, shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' .* shape \(16, 64\), the config implies \(32, 64\)"):
        model_lib.from_pretrained(folder)


def test_wrong_fused_shape_is_named(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("phi3-sliding")
    copy = tmp_path / "phi3"
    shutil.copytree(folder, copy)

    def shrink(tensors):
        tensors["model.layers.0.self_attn.qkv_proj.weight"] = tensors["model.layers.0.self_attn.qkv_proj.weight"][:-4]

    _rewrite_weights(copy, shrink)
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight' has shape \(188, 64\): output dimension 188, expected 192"):
        model_lib.from_pretrained(copy)


def test_missing_and_extra_experts_are_named(tiny_checkpoint, tmp_path):
    """Per-expert tensors stack into one parameter; a missing or surplus expert is named."""
    folder, _ = tiny_checkpoint("mixtral-moe")
    copy = tmp_path / "mixtral"
    shutil.copytree(folder, copy)
    _rewrite_weights(copy, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight$"):
        model_lib.from_pretrained(copy)
    shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"
    _rewrite_weights(copy, lambda t: t.update({extra: t["model.layers.0.block_sparse_moe.experts.0.w1.weight"]}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.block_sparse_moe\.experts\.4\.w1\.weight' .*expert 4 of 4"):
        model_lib.from_pretrained(copy)


def test_truncated_file_names_the_tensor(llama_copy):
    folder, _ = llama_copy
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"tensor '.*' in .*model\.safetensors is truncated"):
        model_lib.from_pretrained(folder)
    file.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated inside its header"):
        model_lib.from_pretrained(folder)


def test_unknown_architecture_lists_supported(llama_copy):
    folder, _ = llama_copy
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownArchitectureError, match=r"'FancyNewForCausalLM'; supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_lib.from_pretrained(folder)


def test_missing_config_and_weights_are_named(llama_copy, tmp_path):
    folder, _ = llama_copy
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"no safetensors weights in checkpoint folder {folder}"):
        model_lib.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"no config.json in checkpoint folder {folder}"):
        model_lib.from_pretrained(folder)


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama-gqa")
    model_lib.save_pretrained(model_lib.from_pretrained(folder), tmp_path / "s", max_shard_size=40_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which is missing"):
        model_lib.from_pretrained(tmp_path / "s")
