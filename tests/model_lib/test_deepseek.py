"""DeepSeek-V3 checkpoints as published: the MTP block after the stack, FP8 weights with 128 x 128
(here 32 x 32) block scales. Logit parity of the families is in test_parity.py's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import model_lib
from model_lib.checkpoint import CheckpointError
from tests.model_lib.test_prequantized import fp8
from tests.spec_drafts import mtp_tensors
from tests.tiny_models import SEQ_LEN, assert_logits_close, hf_logits, random_ids

CASE = "deepseek_v3-noaux-yarn"
FP8_CONFIG = dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3", weight_block_size=[32, 32])
UNQUANTIZED = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")  # as DeepSeek-V3 ships


def write(folder, tensors: dict[str, object], config: dict) -> None:
    folder.mkdir()
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def published(tiny_checkpoint, tmp_path_factory):
    """(FP8 + MTP checkpoint, float checkpoint of the same dequantized weights, transformers model of the latter)."""
    import transformers

    source, hf_model = tiny_checkpoint(CASE)
    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    layers = config["num_hidden_layers"]
    rng = np.random.RandomState(0)
    tensors.update(mtp_tensors(tensors, layers, rng))
    config["num_nextn_predict_layers"] = 1

    quantized, dequantized = {}, {}
    pack = fp8("block", 32)
    for name, value in tensors.items():
        if value.ndim == 2 and not name.endswith(UNQUANTIZED):
            packed, dequantized[name] = pack(value, rng)
            quantized.update({f"{name[: -len('.weight')]}.{leaf}": v for leaf, v in packed.items()})
        else:
            quantized[name] = dequantized[name] = value
    root = tmp_path_factory.mktemp("deepseek_v3")
    write(root / "fp8", quantized, {**config, "quantization_config": FP8_CONFIG})
    write(root / "float", dequantized, config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "float", dtype=torch.float32).eval()
    return root / "fp8", root / "float", reference, dequantized


def test_fp8_checkpoint_with_mtp_block_loads_and_matches(published, forward, tmp_path):
    fp8_folder, float_folder, reference, dequantized = published
    model = model_lib.from_pretrained(fp8_folder)
    assert model.config.num_mtp_layers == 1 and len(model.mtp) == 1
    ids = random_ids(2, SEQ_LEN, seed=1)
    assert_logits_close(forward(model, ids, np.ones_like(ids)), hf_logits(reference, ids))

    # The MTP block holds the checkpoint's (dequantized) tensors: kernels transposed, experts stacked.
    mtp, n = model.mtp[0], model.config.num_layers
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj.kernel[...]), dequantized[f"model.layers.{n}.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.mlp.experts.down_proj.kernel[...][3]),
                                  dequantized[f"model.layers.{n}.mlp.experts.3.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.mlp.shared_expert.up_proj.kernel[...]),
                                  dequantized[f"model.layers.{n}.mlp.shared_experts.up_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.self_attn.kv_b_proj.kernel[...]),
                                  dequantized[f"model.layers.{n}.self_attn.kv_b_proj.weight"].T)

    # Saved back under the checkpoint's names, MTP block included (less its copies of the embeddings and
    # head, which are not loaded), as float.
    model_lib.save_pretrained(model, tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    copies = {f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"}
    assert set(saved) == set(dequantized) - copies
    for name in (f"model.layers.{n}.enorm.weight", f"model.layers.{n}.shared_head.norm.weight",
                 f"model.layers.{n}.mlp.gate.e_score_correction_bias", f"model.layers.{n}.self_attn.q_a_proj.weight"):
        np.testing.assert_array_equal(saved[name], dequantized[name])


def test_mtp_block_follows_the_checkpoint(tiny_checkpoint, published, tmp_path):
    # transformers saves DeepSeek-V3 without the block whatever num_nextn_predict_layers says (1 by default).
    folder, hf_model = tiny_checkpoint(CASE)
    assert hf_model.config.num_nextn_predict_layers == 1
    assert model_lib.from_pretrained(folder).mtp is None

    # A block the config does not announce is an unexpected tensor, named.
    _, float_folder, _, dequantized = published
    config = json.loads((float_folder / "config.json").read_text())
    write(tmp_path / "unannounced", dequantized, {**config, "num_nextn_predict_layers": 0})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\."):
        model_lib.from_pretrained(tmp_path / "unannounced")


def test_unsupported_router_settings_are_named():
    import dataclasses

    import transformers

    from model_lib.families.deepseek import deepseek_v2_config, deepseek_v3_config
    from tests.tiny_models import CASES_BY_NAME

    def config(name: str, **changes):
        case = CASES_BY_NAME[name]
        return getattr(transformers, case.config_class)(**{**case.dims, **case.overrides, **changes})

    with pytest.raises(ValueError, match="topk_method 'noaux_tc' is not supported"):
        deepseek_v2_config(config("deepseek_v2-greedy-qlora", topk_method="noaux_tc"), "DeepseekV2ForCausalLM")
    with pytest.raises(ValueError, match="needs n_group and topk_group"):
        deepseek_v2_config(config("deepseek_v2-greedy-qlora", topk_method="group_limited_greedy"), "DeepseekV2ForCausalLM")
    with pytest.raises(ValueError, match=r"moe_num_groups \(3\) to divide num_experts \(8\)"):
        deepseek_v3_config(config("deepseek_v3-noaux-yarn", n_group=3), "DeepseekV3ForCausalLM")
    good = deepseek_v3_config(config("deepseek_v3-noaux-yarn"), "DeepseekV3ForCausalLM")
    with pytest.raises(ValueError, match="num_mtp_layers"):
        dataclasses.replace(good, num_mtp_layers=100)
