"""Shared pieces of the serving tests: prompts and transformers' greedy reference."""

from __future__ import annotations

import numpy as np

from tests.tiny_models import VOCAB

PROMPT_LENGTHS = (3, 9, 17, 30)  # crossing every tiny sliding window and several pages
MAX_TOKENS = 8


def prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(3, VOCAB, size=n).tolist() for n in lengths]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers `generate(do_sample=False)` on one unpadded prompt; stops at EOS as configured."""
    import torch

    from tests.tiny_models import _reset_dynamic_rope

    _reset_dynamic_rope(hf_model)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def token_prompts(prompt_ids: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompt_ids]
