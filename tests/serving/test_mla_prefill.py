"""The host's choice of MLA rows for the expanded form (`serving/engine/mla_prefill.py`)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pallas_kernels.paged_attention import PagedMetadata
from serving.engine.mla_prefill import expanded_from, expanded_prefill_tokens


def step(q_lens: list[int], pad_seqs: int = 2) -> PagedMetadata:
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu = np.concatenate([cu, np.full(pad_seqs, cu[-1], np.int32)])
    seqs = len(q_lens) + pad_seqs
    return PagedMetadata(cu, np.full(seqs, 64, np.int32), np.zeros((seqs, 4), np.int32), np.int32(len(q_lens)))


# (new tokens per sequence, threshold, first expanded sequence)
CHOICES = [
    ([1, 1, 300], 171, 2),  # decode rows absorbed, the long chunk expanded
    ([1, 200, 300], 171, 1),  # the trailing run of long chunks
    ([1, 300, 20], 171, None),  # the last chunk is short: the whole step absorbed
    ([300, 1, 300], 171, 2),  # the run stops at the decode row
    ([400], 171, 0),
    ([1, 1], 171, None),
    ([1, 300], 0, None),  # 0: never
]


@pytest.mark.parametrize("q_lens,threshold,first", CHOICES)
def test_expanded_from_is_the_trailing_run_of_long_chunks(q_lens, threshold, first):
    assert expanded_from(step(q_lens), threshold) == first


def test_threshold_defaults_to_the_crossover_and_is_bounded():
    # The ModelConfig fields the choice reads, at DeepSeek-V3's shape.
    mla = SimpleNamespace(architecture="DeepseekV3ForCausalLM", attention_kind="mla", kv_lora_rank=512,
                          qk_nope_head_dim=128, v_head_dim=128)
    assert expanded_prefill_tokens(mla, None, 2048) == 171
    assert expanded_prefill_tokens(mla, None, 64) == 64  # capped by the step budget
    assert expanded_prefill_tokens(mla, 0, 2048) == 0
    with pytest.raises(ValueError, match=r"mla_expanded_prefill_tokens must be in \[0, max_num_batched_tokens=64\]"):
        expanded_prefill_tokens(mla, 65, 64)
    with pytest.raises(ValueError, match="must be in"):
        expanded_prefill_tokens(mla, -1, 64)
    dense = SimpleNamespace(architecture="LlamaForCausalLM", attention_kind="standard")
    assert expanded_prefill_tokens(dense, None, 64) == 0
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MLA layers"):
        expanded_prefill_tokens(dense, 16, 64)
