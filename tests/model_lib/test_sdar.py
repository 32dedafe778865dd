"""SDAR (reference "own"): the config mapping and the block-causal mask.

The shared tables cover logits against tests/sdar_reference.py (`sdar-block-causal`, padded
batch included), bf16, sharding and stray config keys; tests/serving/test_block_diffusion.py
the decoding. This file adds the invariants of the mask and the config's own keys.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import model_lib
from model_lib.families.sdar import sdar_config
from tests.tiny_models import DIMS, VOCAB, random_ids


def test_config_keys(tiny_checkpoint):
    folder, _ = tiny_checkpoint("sdar-block-causal")
    config, family = model_lib.load_config(folder)
    assert family.remote_code and family.name == "sdar"
    assert (config.block_causal_size, config.mask_token_id) == (4, VOCAB - 1)
    assert config.qk_norm == "head" and config.head_dim == 32 and config.num_kv_heads == 2
    assert not config.tie_word_embeddings and config.eos_token_ids == (2,)


def _remote(**fields) -> transformers.PretrainedConfig:
    base = dict(DIMS, num_key_value_heads=2, max_position_embeddings=64, block_size=4, mask_token_id=VOCAB - 1)
    return transformers.PretrainedConfig.from_dict({**base, **fields})


def test_head_dim_defaults_to_sdar_configs_128():
    assert sdar_config(_remote(), "SDARForCausalLM").head_dim == 128


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(block_size=None), "positive integer block_size"),
        (dict(block_size=0), "positive integer block_size"),
        (dict(mask_token_id=None), "mask_token_id inside the vocabulary"),
        (dict(mask_token_id=VOCAB), "mask_token_id inside the vocabulary"),
    ],
)
def test_config_refusals(fields, match):
    with pytest.raises(ValueError, match=match):
        sdar_config(_remote(**fields), "SDARForCausalLM")


def test_a_block_sees_all_of_itself_and_nothing_later(tiny_checkpoint, forward):
    """Changing token j changes the logits of exactly the tokens whose block is not before j's."""
    folder, _ = tiny_checkpoint("sdar-block-causal")
    model = model_lib.from_pretrained(folder)
    ids = random_ids(1, 12, seed=3)
    base = np.asarray(forward(model, ids, np.ones_like(ids)))[0]
    for j in (1, 5, 11):
        changed = ids.copy()
        changed[0, j] = (changed[0, j] + 1) % VOCAB
        moved = np.abs(np.asarray(forward(model, changed, np.ones_like(ids)))[0] - base).max(-1) > 1e-6
        assert moved.tolist() == [i // 4 >= j // 4 for i in range(12)], j


def test_config_json_round_trip(tiny_checkpoint):
    """The remote keys come back unchanged when the model is saved (block_size, mask_token_id, auto_map)."""
    folder, _ = tiny_checkpoint("sdar-block-causal")
    saved = json.loads(model_lib.load_config(folder)[0].hf_config_json)
    assert saved["block_size"] == 4 and saved["mask_token_id"] == VOCAB - 1 and saved["model_type"] == "sdar"
