"""Prompt lookup (n-gram) proposals: the sequence's own history predicts its continuation.

The last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) are looked up among
the earlier tokens; the tokens after the latest earlier occurrence are the drafts. Pays off when
the output copies spans of the prompt (code edits, extraction, summaries quoting their source).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from serving.engine.sequence import Sequence
from serving.spec_decode.proposer import Proposal, Proposer


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens following the latest earlier occurrence of the longest matching suffix n-gram."""
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting before the suffix itself, each with at least one token after it.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, wanted: dict[Sequence, int]) -> Proposal:
        proposal = Proposal()
        for seq, k in wanted.items():
            drafts = lookup(np.asarray(seq.tokens, np.int32), self.min_n, self.max_n, k)
            if drafts:
                proposal.drafts[seq] = drafts
        return proposal
