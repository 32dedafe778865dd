"""Pooling models against their references on tiny random configs, one padded batch each (float32).

Encoders and classifiers against transformers (hidden states at every real token, the three poolings,
class logits); the Qwen2 reward models against their published head on transformers' Qwen2Model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from model_lib.checkpoint import CheckpointError
from model_lib.encoders import PoolingSpec, load_pooling_model, pool
from model_lib.encoders.pooling import read_pooling_spec
from pallas_kernels.flash_attention import attention
from tests.encoder_models import LENGTHS, build_encoder, build_reward, padded_inputs
from tests.tiny_models import assert_logits_close

ENCODERS = [  # (architecture, config class, overrides)
    ("BertModel", "BertConfig", {}),
    ("RobertaModel", "RobertaConfig", dict(pad_token_id=1)),
    ("XLMRobertaModel", "XLMRobertaConfig", dict(pad_token_id=1, hidden_act="gelu_new")),
    ("BertForSequenceClassification", "BertConfig", dict(num_labels=3)),
    ("RobertaForSequenceClassification", "RobertaConfig", dict(pad_token_id=1, num_labels=2)),
    ("XLMRobertaForSequenceClassification", "XLMRobertaConfig", dict(pad_token_id=1, num_labels=1)),
]


def _torch(*arrays):
    return [torch.as_tensor(a).long() for a in arrays]


@pytest.mark.parametrize("architecture,config_class,overrides", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_encoder_matches_transformers(tmp_path, architecture, config_class, overrides):
    ref = build_encoder(architecture, tmp_path, config_class, **overrides)
    model = load_pooling_model(tmp_path)
    ids, mask, types = padded_inputs(type_ids=config_class == "BertConfig")
    with torch.no_grad():
        out = ref(*_torch(ids, mask, types), output_hidden_states=True)
    if model.task == "classify":
        assert model.num_labels == overrides["num_labels"]
        assert_logits_close(np.asarray(model.outputs(ids, mask, types)), out.logits.numpy())
        return
    hidden = np.asarray(model.net(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    expected = out.hidden_states[-1].numpy()
    for row, n in enumerate(LENGTHS):
        assert_logits_close(hidden[row, :n], expected[row, :n])
    m = mask[..., None].astype(np.float32)
    references = {"cls": expected[:, 0], "mean": (expected * m).sum(1) / m.sum(1),
                  "last": expected[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]}
    for kind, reference in references.items():
        assert_logits_close(np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), kind)), reference)


@pytest.mark.parametrize("architecture", ["Qwen2ForRewardModel", "Qwen2ForProcessRewardModel"])
def test_reward_model_matches_published_head(tmp_path, architecture):
    ref = build_reward(architecture, tmp_path)
    model = load_pooling_model(tmp_path)
    ids, mask, types = padded_inputs(seed=1)
    with torch.no_grad():
        expected = ref(*_torch(ids, mask)).numpy()
    ours = np.asarray(model.outputs(ids, mask, types))
    assert ours.shape == expected.shape == (len(LENGTHS), max(LENGTHS), model.num_labels)
    for row, n in enumerate(LENGTHS):
        assert_logits_close(ours[row, :n], expected[row, :n])


def test_bidirectional_attention_sees_later_tokens_and_never_padding():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(1, 4, 2, 8), jnp.float32) for _ in range(3))
    positions = jnp.arange(4)[None]
    segments = jnp.asarray([[1, 1, 1, 0]])
    out = attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                    kv_segment_ids=segments, scale=0.3, causal=False)
    logits = jnp.einsum("bthd,bshd->bhts", q, k)[..., :3] * 0.3
    expected = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v[:, :3])
    np.testing.assert_allclose(np.asarray(out)[0, :3], np.asarray(expected)[0, :3], rtol=1e-5, atol=1e-6)


def test_sentence_transformers_files_choose_pooling_and_normalisation(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"matryoshka_dimensions": [8, 16]}))
    assert read_pooling_spec(tmp_path, "cls") == PoolingSpec("cls", True, True, (8, 16))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    spec = read_pooling_spec(tmp_path, "cls")
    assert (spec.kind, spec.normalize, spec.max_seq_length) == ("mean", False, 40)
    spec.check_dimensions(16, 32)
    with pytest.raises(ValueError, match="dimensions=12 is not supported"):
        spec.check_dimensions(12, 32)
    with pytest.raises(ValueError, match="does not support matryoshka"):
        PoolingSpec().check_dimensions(8, 32)


def test_checkpoint_errors_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    build_encoder("BertModel", tmp_path, "BertConfig")
    tensors = load_file(tmp_path / "model.safetensors")
    bias = tensors.pop("encoder.layer.1.output.dense.bias")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: encoder\.layer\.1\.output\.dense\.bias"):
        load_pooling_model(tmp_path)
    save_file({**tensors, "encoder.layer.1.output.dense.bias": bias[:-1]}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.1\.output\.dense\.bias'.* shape \(31,\)"):
        load_pooling_model(tmp_path)


def test_readme_lists_every_pooling_architecture():
    from pathlib import Path

    from model_lib.encoders import POOLING_ARCHITECTURES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| pooling architecture |"):].split("\n\n")[0]
    assert all(f"`{architecture}`" in table for architecture in POOLING_ARCHITECTURES)


def test_decoder_loading_points_pooling_checkpoints_to_their_loader(tmp_path):
    import model_lib

    build_encoder("BertModel", tmp_path, "BertConfig")
    with pytest.raises(model_lib.UnknownArchitectureError, match="BertModel is a pooling model: load it with"):
        model_lib.from_pretrained(tmp_path)
